"""Frozen-prefix execution without autograd, and an exact, memory-bounded per-subject cache of its output."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from models.convvit import ConvViT, PrefixFeatures

__all__ = ["PrefixCache", "backbone_version", "input_fingerprint", "run_frozen_prefix"]

DEFAULT_CACHE_BYTES = 2 * 1024**3


def _prefix_modules(backbone: ConvViT, n_blocks: int) -> list[nn.Module]:
    return [backbone.enc_down_dict, backbone.enc_fusion_dict, *backbone.encoder.blocks[:n_blocks]]


@contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    modes = [[m.training for m in module.modules()] for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, module_modes in zip(modules, modes, strict=True):
            for sub, mode in zip(module.modules(), module_modes, strict=True):
                sub.training = mode


def run_frozen_prefix(backbone: ConvViT, images: torch.Tensor, n_blocks: int) -> PrefixFeatures:
    """The stem, skip projections and first `n_blocks` blocks under no_grad, in eval mode, one sample at a time.

    The prefix is frozen, so it builds no autograd graph and keeps no activations. Eval mode (no drop path) makes
    its output a pure function of (weights, input); running sample by sample bounds the stem's transient buffers to
    one sample and makes each sample's output independent of the batch it came in, so a cache hit is bitwise the
    uncached result.
    """
    with torch.no_grad(), _eval_mode(_prefix_modules(backbone, n_blocks)):
        if not len(images):  # an empty batch (DP-SGD's Poisson sampling): the features' shapes, without a row
            one = backbone.forward_prefix(images.new_zeros((1, *images.shape[1:])), n_blocks)
            return PrefixFeatures(tokens=one.tokens[:0], skip_tokens=one.skip_tokens[:0])
        parts = [backbone.forward_prefix(image.unsqueeze(0), n_blocks) for image in images]
    if len(parts) == 1:
        return parts[0]
    return PrefixFeatures(
        tokens=torch.cat([part.tokens for part in parts]), skip_tokens=torch.cat([part.skip_tokens for part in parts])
    )


def backbone_version(backbone: ConvViT, n_blocks: int) -> tuple[int, ...]:
    """Changes whenever a prefix weight is modified in place (load_state_dict, optimiser, copy_) or replaced.

    Built from each prefix tensor's identity, storage pointer and autograd version counter, which PyTorch bumps on
    every in-place write.
    """
    tensors = [backbone.encoder.cls_token]
    for module in _prefix_modules(backbone, n_blocks):
        tensors.extend(module.parameters())
        tensors.extend(module.buffers())
    return (n_blocks, *(v for t in tensors for v in (id(t), t.data_ptr(), t._version)))


def input_fingerprint(image: torch.Tensor) -> bytes:
    """A 128-bit BLAKE2b digest of one input's shape, dtype and bytes: any change of the input changes it."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(image.shape)}|{image.dtype}".encode())
    digest.update(image.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.digest()


@dataclass
class _Entry:
    fingerprint: bytes
    tokens: torch.Tensor
    skip_tokens: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.skip_tokens.nbytes


class PrefixCache:
    """Per-subject frozen-prefix features, reused while the input and the prefix weights are unchanged.

    Exact: a hit returns the very tensors an earlier uncached prefix pass produced for that subject. Entries are
    keyed by subject id and checked against a fingerprint of the input, so an augmented or edited input is a miss
    (and replaces the entry); any change of the prefix weights or of `n_blocks` empties the cache. Memory is bounded
    by `max_bytes` with least-recently-used eviction. One entry holds (1 + 2 * n_patches) * embed_dim values of the
    prefix dtype: 14.2 MB per subject for CineMA-base in fp32 (about 150 subjects in the 2 GiB default), 0.89 MB for
    the `small` preset, 33 kB for `micro`. Entries stay on the device they were computed on. A training set larger
    than the bound is still correct, but an epoch-order scan then misses every time.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"PrefixCache.max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._version: tuple[int, ...] | None = None
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry (the hit / miss counters are kept)."""
        self._entries.clear()
        self.nbytes = 0

    def features(
        self, backbone: ConvViT, images: torch.Tensor, subject_ids: Sequence[str], n_blocks: int
    ) -> PrefixFeatures:
        """The prefix features of a batch, computing only the subjects that are missing or whose input changed."""
        if len(subject_ids) != images.shape[0]:
            raise ValueError(f"PrefixCache: {len(subject_ids)} subject ids for a batch of {images.shape[0]} inputs")
        if len(set(subject_ids)) != len(subject_ids):
            raise ValueError(f"PrefixCache: duplicate subject ids in one batch: {list(subject_ids)}")
        version = backbone_version(backbone, n_blocks)
        if version != self._version:
            self.clear()
            self._version = version
        fingerprints = [input_fingerprint(image) for image in images]
        entries: list[_Entry | None] = []
        for subject, fingerprint in zip(subject_ids, fingerprints, strict=True):
            entry = self._entries.get(subject)
            entries.append(entry if entry is not None and entry.fingerprint == fingerprint else None)
        missing = [i for i, entry in enumerate(entries) if entry is None]
        self.hits += len(entries) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = run_frozen_prefix(backbone, images[missing], n_blocks)
            if len(missing) == len(entries):
                self._store_all(subject_ids, fingerprints, computed)
                return computed
            for row, i in enumerate(missing):
                entries[i] = _Entry(fingerprints[i], computed.tokens[row], computed.skip_tokens[row])
            self._store_all([subject_ids[i] for i in missing], [fingerprints[i] for i in missing], computed)
        for subject in subject_ids:
            if subject in self._entries:
                self._entries.move_to_end(subject)
        return PrefixFeatures(
            tokens=torch.stack([entry.tokens for entry in entries]),  # type: ignore[union-attr]
            skip_tokens=torch.stack([entry.skip_tokens for entry in entries]),  # type: ignore[union-attr]
        )

    def _store_all(self, subject_ids: Sequence[str], fingerprints: Sequence[bytes], computed: PrefixFeatures) -> None:
        for row, (subject, fingerprint) in enumerate(zip(subject_ids, fingerprints, strict=True)):
            # clone: a row view would pin the whole batch's storage and break the byte accounting
            self._put(subject, _Entry(fingerprint, computed.tokens[row].clone(), computed.skip_tokens[row].clone()))

    def _put(self, subject: str, entry: _Entry) -> None:
        old = self._entries.pop(subject, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if entry.nbytes > self.max_bytes:
            return
        while self._entries and self.nbytes + entry.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
        self._entries[subject] = entry
        self.nbytes += entry.nbytes
