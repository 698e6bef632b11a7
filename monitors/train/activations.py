"""Token activations of texts at chosen layers, batched: the input of probe and SAE training.

Texts are right-padded into batches with an attention mask; with a causal model a real token never
attends to the padding after it, so each kept row equals what a one-text forward gives (the tests
check this to 1e-4). Rows are only real tokens at or after a text's *start* position:

* position 0 is always dropped when ``skip_bos`` (the default): the BOS is an attention sink whose
  residual norm is orders of magnitude above the rest (~55,000 on Gemma 3 270M) and would dominate any
  statistic;
* a per-text ``starts[i]`` (a token position) drops every earlier token. To count only the tokens after
  a text prefix (e.g. the fact after an instruction), use :func:`prefix_starts`: the start is the length
  of the longest common prefix of ``encode(prefix)`` and ``encode(text)``. When the prefix ends on a
  token boundary that is ``len(encode(prefix))``; when the tokenizer merges the prefix's last piece with
  the text that follows (e.g. a trailing space), the merged token counts as part of the span.
  :func:`char_starts` does the same for character offsets (prefix = ``text[:offset]``).

The forward stops after the deepest requested layer (the remaining layers and the unembedding are not
run), which on Gemma 3 270M saves most of the cost: its 262k-token unembedding dominates a forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monitors.capture import recording
from steering.errors import invalid

Encode = Callable[[str], list[int]]
Progress = Callable[[int, int], None]  # (texts done, texts in total)


@dataclass(frozen=True)
class TokenActivations:
    """Kept token rows of some texts. ``acts[L]`` is [N, d_model] float32 on CPU; row r belongs to
    text ``text_index[r]`` (an index into the texts given) at token position ``position[r]``."""

    acts: dict[int, torch.Tensor]
    text_index: torch.Tensor
    position: torch.Tensor
    token_id: torch.Tensor
    n_texts: int

    @property
    def n_tokens(self) -> int:
        return int(self.text_index.numel())

    def counts(self) -> torch.Tensor:
        """Kept tokens per text [n_texts] int64."""
        return torch.bincount(self.text_index, minlength=self.n_texts)

    def select(self, texts: torch.Tensor | Sequence[int]) -> TokenActivations:
        """Rows of the given texts only; ``text_index`` keeps the original indices."""
        keep = torch.zeros(self.n_texts, dtype=torch.bool)
        keep[torch.as_tensor(list(texts) if not isinstance(texts, torch.Tensor) else texts, dtype=torch.long)] = True
        rows = keep[self.text_index]
        return TokenActivations({k: v[rows] for k, v in self.acts.items()}, self.text_index[rows],
                                self.position[rows], self.token_id[rows], self.n_texts)


def prefix_starts(encode: Encode, texts: Sequence[str], prefixes: Sequence[str]) -> list[int]:
    """Token start of each text's span after ``prefixes[i]`` (which must be a prefix of ``texts[i]``):
    the longest common prefix of the two tokenizations (see the module docstring). An empty prefix gives 0."""
    if len(texts) != len(prefixes):
        raise invalid("prefixes", f"has {len(prefixes)} entries for {len(texts)} texts; give one per text")
    out = []
    for i, (text, prefix) in enumerate(zip(texts, prefixes, strict=True)):
        if not text.startswith(prefix):
            raise invalid(f"prefixes[{i}]", f"{prefix[:40]!r} is not a prefix of text {i} ({text[:40]!r})")
        if not prefix.strip():
            out.append(0)
            continue
        a, b = encode(prefix), encode(text)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        out.append(n)
    return out


def char_starts(encode: Encode, texts: Sequence[str], offsets: Sequence[int]) -> list[int]:
    """Token starts for character offsets: the span of text i begins at ``texts[i][offsets[i]:]``."""
    for i, (text, off) in enumerate(zip(texts, offsets, strict=True)):
        if not 0 <= off <= len(text):
            raise invalid(f"offsets[{i}]", f"{off} is out of range; allowed 0..{len(text)}")
    return prefix_starts(encode, texts, [t[:o] for t, o in zip(texts, offsets, strict=True)])


class _Stop(Exception):
    """Raised by a hook after the deepest recorded layer to skip the rest of the forward."""


def _plan(ids: list[list[int]], window: int, batch_size: int, seed: int | None) -> list[list[int]]:
    """Batches of text indices. Texts are sorted by length within consecutive windows of ``window``
    texts (less padding, while the stream still moves through the texts in their given order). With
    ``seed``, each window's batches are then visited in a seeded random order, so the stream does not
    run from short to long texts within a window."""
    batches: list[list[int]] = []
    w = max(1, window)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for lo in range(0, len(ids), w):
        chunk = list(range(lo, min(lo + w, len(ids))))
        if w > 1:
            chunk.sort(key=lambda i: len(ids[i]))
        group = [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        if g is not None:
            group = [group[n] for n in torch.randperm(len(group), generator=g).tolist()]
        batches.extend(group)
    return batches


def iter_activations(model: nn.Module, layers: nn.ModuleList, encode: Encode, texts: Sequence[str],
                     which: Sequence[int], *, pad_id: int, starts: Sequence[int] | None = None,
                     batch_size: int = 8, max_length: int | None = None, skip_bos: bool = True,
                     sort_window: int = 256, shuffle_seed: int | None = None, skip_tokens: int = 0,
                     progress: Progress | None = None) -> Iterator[TokenActivations]:
    """Yield the kept rows batch by batch (each text's rows in one batch, in position order).

    ``skip_tokens`` drops the first kept rows of the stream (for resuming): batches wholly inside the
    skipped part are not run, and the batch it ends in is run whole and trimmed, so every row has the
    value an unskipped stream gives it, bit for bit. ``max_length`` truncates each text's ids first.
    ``sort_window`` and ``shuffle_seed`` set the visiting order (see ``_plan``); 1 keeps the given order.
    """
    if not which:
        raise invalid("layers", "is empty; give at least one layer")
    for layer in which:
        if not 0 <= layer < len(layers):
            raise invalid("layers", f"{layer} is out of range; allowed 0..{len(layers) - 1}")
    if batch_size < 1:
        raise invalid("batch_size", f"must be >= 1, got {batch_size}")
    if starts is not None and len(starts) != len(texts):
        raise invalid("starts", f"has {len(starts)} entries for {len(texts)} texts; give one per text")
    ids = [encode(t) for t in texts]
    if max_length is not None:
        ids = [x[:max_length] for x in ids]
    floor = 1 if skip_bos else 0
    first = [max(floor, starts[i] if starts is not None else 0) for i in range(len(ids))]
    device = next(model.parameters()).device
    done, skip = 0, max(0, skip_tokens)
    for batch in _plan(ids, sort_window, batch_size, shuffle_seed):
        done += len(batch)
        kept = sum(max(0, len(ids[i]) - first[i]) for i in batch)
        if skip >= kept:
            skip -= kept
            out = None
        else:
            out = _forward(model, layers, ids, first, batch, which, pad_id, device)
        if progress is not None:
            progress(done, len(texts))
        if out is not None:
            acts, text_index, position, token_id = out
            cut, skip = skip, 0
            # yielded outside inference mode and with no hooks left on the model, so the consumer may
            # train (autograd) or run the model itself between batches
            yield TokenActivations({k: v[cut:] for k, v in acts.items()}, text_index[cut:], position[cut:],
                                   token_id[cut:], n_texts=len(texts))


def _raise_stop(module: nn.Module, args: Any, output: Any) -> None:
    raise _Stop


def _forward(model: nn.Module, layers: nn.ModuleList, ids: list[list[int]], first: list[int],
             batch: list[int], which: Sequence[int], pad_id: int,
             device: torch.device) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor] | None:
    batch = [i for i in batch if len(ids[i]) > first[i]]
    if not batch:
        return None
    width = max(len(ids[i]) for i in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
        mask[row, :len(ids[i])] = 1
    with torch.inference_mode(), recording(layers, list(which)) as store:
        handle = layers[max(which)].register_forward_hook(_raise_stop)
        try:
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
    keep = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, i in enumerate(batch):
        keep[row, first[i]:len(ids[i])] = True
    rows = keep.nonzero()  # row-major: each text's positions in order
    # indexed outside inference mode: the rows are normal tensors that autograd may use
    acts = {layer: store[layer].cpu()[keep] for layer in which}
    text_index = torch.tensor(batch, dtype=torch.long)[rows[:, 0]]
    return acts, text_index, rows[:, 1].clone(), input_ids[keep]


def collect_activations(model: nn.Module, layers: nn.ModuleList, encode: Encode, texts: Sequence[str],
                        which: Sequence[int], *, pad_id: int, starts: Sequence[int] | None = None,
                        batch_size: int = 8, max_length: int | None = None, skip_bos: bool = True,
                        progress: Progress | None = None) -> TokenActivations:
    """All kept rows of ``texts``, ordered by text then position (see :func:`iter_activations`)."""
    if not texts:
        raise invalid("texts", "is empty; give at least one text")
    parts = list(iter_activations(model, layers, encode, texts, which, pad_id=pad_id, starts=starts,
                                  batch_size=batch_size, max_length=max_length, skip_bos=skip_bos,
                                  progress=progress))
    if not parts:
        d = _width(model)
        empty = torch.zeros(0, dtype=torch.long)
        return TokenActivations({k: torch.zeros(0, d) for k in which}, empty, empty, empty, len(texts))
    text_index = torch.cat([p.text_index for p in parts])
    position = torch.cat([p.position for p in parts])
    order = torch.argsort(text_index * (int(position.max()) + 1) + position)
    return TokenActivations({k: torch.cat([p.acts[k] for p in parts])[order] for k in which}, text_index[order],
                            position[order], torch.cat([p.token_id for p in parts])[order], len(texts))


def _width(model: nn.Module) -> int:
    config: Any = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return int(getattr(text_config, "hidden_size", 0))


def shuffled_epochs(rows: torch.Tensor, *, seed: int = 0, chunk: int = 8192,
                    epochs: int | None = None) -> Callable[[int], Iterator[torch.Tensor]]:
    """A resumable stream over cached token rows [N, d]: each epoch is a new seeded permutation of all
    N rows (tokens of different texts mixed, as SAE training wants), yielded ``chunk`` rows at a time.
    Calling the result with n opens the stream after its first n rows."""
    n = rows.shape[0]
    if n == 0:
        raise invalid("rows", "is empty; nothing to stream")

    def stream(skip: int) -> Iterator[torch.Tensor]:
        epoch, rest = divmod(skip, n)
        while epochs is None or epoch < epochs:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            for lo in range(rest, n, chunk):
                yield rows[perm[lo:lo + chunk]]
            epoch, rest = epoch + 1, 0

    return stream


def token_stream(model: nn.Module, layers: nn.ModuleList, encode: Encode, texts: Sequence[str], layer: int, *,
                 pad_id: int, batch_size: int = 8, max_length: int | None = 256, seed: int = 0,
                 epochs: int | None = None) -> Callable[[int], Iterator[torch.Tensor]]:
    """A resumable stream of token rows [n, d_model] at ``layer`` for SAE training.

    Epoch e visits ``texts`` in a seeded random order (a new one per epoch); ``epochs`` None repeats
    forever. Calling the result with n opens the stream after its first n rows: whole epochs and texts
    before that point are skipped without forwards, so a resumed run continues with the same data.
    """
    kept = sum(max(0, len(encode(t)[:max_length] if max_length is not None else encode(t)) - 1) for t in texts)
    if kept == 0:
        raise invalid("texts", "have no tokens after BOS; give non-empty texts")

    def order(epoch: int) -> list[str]:
        perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        return [texts[i] for i in perm.tolist()]

    def stream(skip: int) -> Iterator[torch.Tensor]:
        epoch, rest = divmod(skip, kept)
        while epochs is None or epoch < epochs:
            for b in iter_activations(model, layers, encode, order(epoch), [layer], pad_id=pad_id,
                                      batch_size=batch_size, max_length=max_length, skip_tokens=rest,
                                      sort_window=batch_size * 16, shuffle_seed=seed * 1_000_003 + epoch):
                yield b.acts[layer]
            epoch, rest = epoch + 1, 0

    return stream
