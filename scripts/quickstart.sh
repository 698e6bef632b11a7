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
  $SW vector diff --layers 6,12 --position mean -o .cache/demo/weddings.safetensors \
    --positive "I love talking about weddings." --positive "Weddings are the best topic." \
    --positive "Let me tell you about a wedding." \
    --negative "I love talking about the weather." --negative "The weather is the best topic." \
    --negative "Let me tell you about the weather."
fi
PROMPT="I went up to my friend and said"
# The monitor watches layer 12, downstream of the edit at layer 6: a reading is taken before the edits
# of its own layer, so watching layer 6 would see only what the steered tokens do to the stream.
echo "== plain generation, watching the 'weddings' direction at layer 12 =="
$SW generate "$PROMPT" --watch .cache/demo/weddings.safetensors@12 --max-tokens 24
echo
echo "== the same prompt steered with +2 x the vector at layer 6 =="
$SW generate "$PROMPT" --watch .cache/demo/weddings.safetensors@12 \
  --steer .cache/demo/weddings.safetensors:2@6 --max-tokens 24
