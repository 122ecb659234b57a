"""Building blocks of the CineMA ConvViT (conv stem blocks and transformer blocks), in plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, scale survivors by 1/(1-p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class ConvLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, *spatial) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1).contiguous()


class ConvNormAct(nn.Module):
    """Strided patchifying Conv3d, channel LayerNorm, GELU (CineMA `ConvNormActBlock`)."""

    def __init__(self, in_chans: int, out_chans: int, stride: tuple[int, int, int], norm_eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_chans, out_chans, kernel_size=stride, stride=stride)
        self.norm = ConvLayerNorm(out_chans, eps=norm_eps)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ConvMlp(nn.Module):
    """Pointwise-conv MLP: 1x1x1 conv, GELU, 1x1x1 conv."""

    def __init__(self, chans: int, hidden_chans: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(chans, hidden_chans, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden_chans, chans, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MaskedConvBlock(nn.Module):
    """ConvMAE conv block (unmasked use): x + pw(dw5(pw(norm(x)))), then x + mlp(norm(x))."""

    def __init__(self, chans: int, norm_eps: float, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = ConvLayerNorm(chans, eps=norm_eps)
        self.norm2 = ConvLayerNorm(chans, eps=norm_eps)
        self.conv1 = nn.Conv3d(chans, chans, kernel_size=1)
        self.conv2 = nn.Conv3d(chans, chans, kernel_size=1)
        self.dw_conv = nn.Conv3d(chans, chans, kernel_size=5, padding="same", groups=chans)
        self.mlp = ConvMlp(chans, chans * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv2(self.dw_conv(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention with separate `q` and fused `kv` projections (scaled dot product, 1/sqrt(d))."""

    def __init__(self, dim: int, n_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, dim = x.shape
        q = self.q(x).reshape(batch, n_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(batch, n_tokens, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, n_tokens, dim)))


class Mlp(nn.Module):
    """Transformer MLP: fc1, GELU (erf), dropout, fc2, dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block; each residual branch can be gradient-checkpointed (drop path stays outside)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        norm_eps: float,
        drop_path: float,
        attn_drop: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.grad_ckpt = False
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path2 = DropPath(drop_path)

    def _attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_ckpt = self.grad_ckpt and torch.is_grad_enabled()
        h = checkpoint(self._attn_branch, x, use_reentrant=False) if use_ckpt else self._attn_branch(x)
        x = x + self.drop_path1(h)
        h = checkpoint(self._mlp_branch, x, use_reentrant=False) if use_ckpt else self._mlp_branch(x)
        return x + self.drop_path2(h)
