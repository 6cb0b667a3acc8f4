"""Randomness for DP-SGD: Poisson sampling and Gaussian noise, seeded or cryptographically secure.

DP-SGD's guarantee assumes the adversary cannot predict the noise. ``torch.Generator`` is a
Mersenne Twister (CPU) or Philox (CUDA): fine for reproducible research, but its state can be
recovered from outputs and it is not a cryptographic generator. ``SecureRandom`` draws every
uniform from a ChaCha20 keystream (RFC 8439) under a 256-bit key from the OS (``os.urandom``),
with a fresh nonce per draw. On CPU the keystream comes from OpenSSL through ``cryptography``; on
a GPU the same ChaCha20 block function runs as torch integer ops on the device (no host round
trip for tens of millions of values per step). Both give bit-identical streams (tested).

Gaussians come from Box-Muller on 32-bit uniforms in float64. As in Opacus' ``secure_mode``,
the secure source sums four such normals and halves them, which blurs the float64 lattice of
a single Box-Muller sample (the floating-point attacks on naive samplers, Mironov 2012 and
later). Opacus' own secure mode needs torchcsprng, unmaintained since 2021.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Protocol

import numpy as np
import torch

_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_WORDS_PER_BLOCK = 16
_TWO32 = float(2**32)


class DPRandom(Protocol):
    """Where a round's sampling and noise come from."""

    secure: bool

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        """``n`` float64 uniforms in (0, 1)."""

    def normal(self, shape: torch.Size | tuple[int, ...], std: float, device: torch.device) -> torch.Tensor:
        """float32 N(0, std^2) of ``shape``."""

    def permutation(self, n: int, device: torch.device) -> torch.Tensor:
        """A uniformly random order of ``range(n)`` (epochs without DP)."""


class SeededRandom:
    """Reproducible streams from ``torch.Generator`` (tests, research replication): NOT secure."""

    secure = False

    def __init__(self, sample_seed: int, noise_seed: int, device: torch.device) -> None:
        self._sample = torch.Generator(device=device).manual_seed(sample_seed)
        self._noise = torch.Generator(device=device).manual_seed(noise_seed)

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=self._sample, device=device, dtype=torch.float64)

    def normal(self, shape: torch.Size | tuple[int, ...], std: float, device: torch.device) -> torch.Tensor:
        return torch.normal(0.0, std, size=tuple(shape), generator=self._noise, device=device)

    def permutation(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.randperm(n, generator=self._sample, device=device)


# ------------------------------------------------------------------------------------------ ChaCha20
def _rotl(x: torch.Tensor, n: int) -> torch.Tensor:
    # int32 two's complement: >> is arithmetic, so mask the bits it drags in
    return (x << n) | ((x >> (32 - n)) & ((1 << n) - 1))


def _quarter(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


def _as_i32(words: tuple[int, ...] | list[int]) -> list[int]:
    return [w - (1 << 32) if w >= (1 << 31) else w for w in words]


def chacha20_words_torch(key: bytes, nonce: bytes, n_words: int, device: torch.device) -> torch.Tensor:
    """ChaCha20 keystream (block counter from 0) as ``n_words`` int32 words, computed on ``device``.

    Vectorised over blocks: the four column (then diagonal) quarter-rounds of every block run as
    one set of elementwise int32 ops, whose wrap-around addition is exactly mod 2^32.
    """
    if len(key) != 32 or len(nonce) != 12:
        raise ValueError("ChaCha20 needs a 32-byte key and a 12-byte nonce")
    n_blocks = -(-n_words // _WORDS_PER_BLOCK)
    if n_blocks >= 2**32:
        raise ValueError("too many words for one nonce")
    fixed = _as_i32([*_CONSTANTS, *struct.unpack("<8I", key)])
    nonce_words = _as_i32(list(struct.unpack("<3I", nonce)))
    counter = torch.arange(n_blocks, device=device, dtype=torch.int64)
    counter = torch.where(counter >= 2**31, counter - 2**32, counter).to(torch.int32)
    init = torch.empty((16, n_blocks), dtype=torch.int32, device=device)
    for i, w in enumerate(fixed):
        init[i].fill_(w)
    init[12] = counter
    for i, w in enumerate(nonce_words):
        init[13 + i].fill_(w)
    a, b, c, d = init[0:4].clone(), init[4:8].clone(), init[8:12].clone(), init[12:16].clone()
    for _ in range(10):
        a, b, c, d = _quarter(a, b, c, d)  # columns
        b, c, d = b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0)
        a, b, c, d = _quarter(a, b, c, d)  # diagonals
        b, c, d = b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)
    out = torch.cat([a, b, c, d], dim=0) + init  # (16, n_blocks)
    return out.t().reshape(-1)[:n_words]


def chacha20_words_openssl(key: bytes, nonce: bytes, n_words: int) -> np.ndarray:
    """The same keystream from OpenSSL (``cryptography``), as uint32."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    # cryptography's 16-byte ChaCha20 "nonce" is the 32-bit little-endian block counter + the 96-bit nonce
    enc = Cipher(algorithms.ChaCha20(key, b"\x00\x00\x00\x00" + nonce), mode=None).encryptor()
    stream = enc.update(bytes(4 * n_words))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


class SecureRandom:
    """Uniforms and Gaussians from ChaCha20 keyed from ``os.urandom`` (or a given key, for tests)."""

    secure = True

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)
        if len(self._key) != 32:
            raise ValueError("SecureRandom needs a 32-byte key")
        self._draws = 0

    def _words(self, n: int, device: torch.device) -> torch.Tensor:
        """``n`` uint32 values (in int64) from a fresh nonce; never reuses a (key, nonce) pair."""
        nonce = self._draws.to_bytes(12, "little")
        self._draws += 1
        if device.type == "cpu":
            return torch.from_numpy(chacha20_words_openssl(self._key, nonce, n).astype(np.int64))
        return chacha20_words_torch(self._key, nonce, n, device).to(torch.int64) & 0xFFFFFFFF

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        return (self._words(n, device).to(torch.float64) + 0.5) / _TWO32

    def _box_muller(self, n: int, device: torch.device) -> torch.Tensor:
        half = -(-n // 2)
        u = (self._words(2 * half, device).to(torch.float64) + 0.5) / _TWO32
        u1, u2 = u[:half], u[half:]
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = (2.0 * math.pi) * u2
        return torch.cat([r * torch.cos(theta), r * torch.sin(theta)])[:n]

    def permutation(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.argsort(self.uniform(n, device))

    def normal(self, shape: torch.Size | tuple[int, ...], std: float, device: torch.device) -> torch.Tensor:
        n = int(math.prod(shape))
        z = self._box_muller(4 * n, device).view(4, n).sum(0) * 0.5
        return (z * std).to(torch.float32).view(tuple(shape))


__all__ = ["DPRandom", "SecureRandom", "SeededRandom", "chacha20_words_openssl", "chacha20_words_torch"]
