#!/usr/bin/env bash
# Set up, prepare the embedded default model (Gemma 3 270M), and show steerwatch at work on it:
# a steering vector made from contrastive prompts, monitored and then applied, token by token.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SW=.venv/bin/steerwatch
mkdir -p .cache/demo
$SW prepare >/dev/null
if [ ! -f .cache/demo/weddings.safetensors ]; then
  $SW vector diff --layers 6 --position mean -o .cache/demo/weddings.safetensors \
    --positive "I love talking about weddings." --positive "Weddings are the best topic." \
    --positive "Let me tell you about a wedding." \
    --negative "I love talking about the weather." --negative "The weather is the best topic." \
    --negative "Let me tell you about the weather."
fi
PROMPT="I went up to my friend and said"
echo "== plain generation, watching the 'weddings' direction at layer 6 =="
$SW generate "$PROMPT" --watch .cache/demo/weddings.safetensors@6 --max-tokens 24
echo
echo "== the same prompt steered with +2 x the vector at layer 6 =="
$SW generate "$PROMPT" --watch .cache/demo/weddings.safetensors@6 \
  --steer .cache/demo/weddings.safetensors:2@6 --max-tokens 24
