"""Network sizes per cascade stage: `get_model_config(stage, size) -> ConfigDict`.

Stages: "base64" (64x64 text->image, UNet), "sr256" (64->256, EfficientUNet),
"sr1024" (256->1024, EfficientUNet). Sizes:
  paper   Imagen App. F.1 / F.2 / F.3 (sized for T5-XXL's 4096-dim text).
  tiny    the smallest networks that exercise every feature (CPU unit tests).
  shapes  the CPU demo on the procedural shapes data: a 32x32 base (an Efficient U-Net
          without low-res input, for CPU speed) and a 32->64 SR
          (for sr1024, the same SR network applied as a 64->128 stage).
  bench   (base64 only) a mid-size network for speed comparisons (benchmarks/unet_step.py):
          64x64, width 64, mult (1,2,3,4), 2 res blocks, self+text attention at 32/16/8,
          4 heads x 32.
  shapes_unet  (base64 only) the plain U-Net (App. F.1's block) at the shapes base's size
          and parameter count, for the Efficient U-Net comparison (§2.5, App. B.1;
          benchmarks/efficient_vs_unet.py, experiments/claim_efficient_unet.py). Selected by
          the stage config's `model=` key: `configs/base64.py:shapes,model=shapes_unet`.

The text input `text_emb [B, L, D]` is not part of the network config: D is the encoder's
width, `imagen_jax.text.registry.text_dim(config.text)`, and L = `config.text.max_length`
(the networks accept any L and infer D at init).

Fields (all stages): kind, out_channels, lowres_cond, text_proj_dim, embed_dim, num_heads,
head_dim, pool_heads, text_positions, dropout, norm_groups, attn_impl, dtype, param_dtype,
remat, image_size (nominal, for benchmarks/tests).
UNet adds base_channels, channel_mult, num_res_blocks, attn_resolutions, text_cross_attention.
EfficientUNet adds channels, num_res_blocks, strides, self_attention, text_cross_attention
(one entry per block), stem_channels, space_to_depth.
Where the paper is silent the choice is marked "(ours)".
"""

from __future__ import annotations

import ml_collections

STAGES = ("base64", "sr256", "sr1024")
SIZES = ("paper", "tiny", "shapes", "bench", "shapes_unet")


def _common(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "unet"
  c.image_size = 64
  c.out_channels = 3
  c.lowres_cond = False
  c.text_proj_dim = 1024  # (ours) width of the shared text projection
  c.embed_dim = 1024  # conditioning (time + pooled text) width
  c.num_heads = None
  c.head_dim = 64
  c.pool_heads = 8  # (ours) heads of the text attention pooling
  # (ours) add fixed sinusoidal token positions to the text sequence; off as in the paper,
  # whose trained T5 already encodes word order (text_conditioning.Conditioning says why).
  c.text_positions = False
  c.dropout = 0.0  # App. F: dropout 0
  c.norm_groups = 32
  c.attn_impl = "auto"  # attention.ATTN_IMPLS; auto follows the target platform
  c.dtype = "float32"  # compute; use "bfloat16" on accelerators
  c.param_dtype = "float32"  # storage
  c.remat = False
  # With remat: what a block keeps for its backward (blocks.REMAT_POLICIES).
  c.remat_policy = "nothing"
  c.update(overrides)
  return c


def _unet(**kw) -> ml_collections.ConfigDict:
  c = _common(kind="unet")
  c.base_channels = 64
  c.channel_mult = (1, 2, 3, 4)
  c.num_res_blocks = 3
  c.attn_resolutions = (32, 16, 8)
  c.text_cross_attention = True
  c.update(kw)
  return c


def _efficient(**kw) -> ml_collections.ConfigDict:
  c = _common(kind="efficient_unet", lowres_cond=True)
  c.channels = (128, 256, 512, 1024)
  c.num_res_blocks = (2, 4, 8, 8)
  c.strides = (2, 2, 2, 2)
  c.self_attention = (False, False, False, True)
  c.text_cross_attention = (False, False, False, True)
  c.stem_channels = 128
  c.space_to_depth = 1
  c.num_heads = 8  # App. F.2: 8 attention heads
  c.head_dim = None
  c.update(kw)
  return c


# (ours) Sinusoidal token positions for the shapes stages: with context-free encoder tokens a
# set-based text pathway cannot tell which colour goes with which shape. byt5-tiny-random's
# tokens carry their context (registry.TINY_RANDOM_BIAS_STD) and a CPU ablation scored no worse
# without positions (docs/results/guidance_gap.md); on because the demo's reported figures use them.
_SHAPES_TEXT_POSITIONS = True


def _base64(size: str) -> ml_collections.ConfigDict:
  if size == "paper":
    # App. F.1: ADM U-Net, channels 512 ("embed_dim 512"), mult [1,2,3,4], 3 res blocks,
    # attention + text at 32/16/8, 64 channels per head, dropout 0. ADM's time-embedding
    # width is 4 x channels = 2048.
    return _unet(base_channels=512, embed_dim=2048, text_proj_dim=2048)
  if size == "tiny":
    return _unet(
        image_size=16,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        head_dim=8,
        embed_dim=32,
        text_proj_dim=16,
        pool_heads=2,
        norm_groups=4,
    )
  if size == "shapes":
    # 32x32 demo base (ours). An Efficient U-Net without low-res input (App. B.1's design, the
    # paper's answer to "faster U-Net"), pixel-unshuffled by 2: 32x32x3 runs at 16x16x12 ->
    # DBlock 128 @ 8x8 -> DBlock 192 @ 4x4 with self-attention; text cross-attention in both.
    # 8.1M params, 38.6 GFLOP per training step at batch 32. The F.1 ADM U-Net at 32x32 (widths
    # 48/96/96, 3.7M params) costs 133 GFLOP per step, 3.4x more, which a 2-core CPU demo cannot
    # afford; the paper-size base stays the F.1 U-Net.
    return _efficient(
        image_size=32,
        lowres_cond=False,
        channels=(128, 192),
        num_res_blocks=(2, 3),
        strides=(2, 2),
        self_attention=(False, True),
        text_cross_attention=(True, True),
        stem_channels=64,
        space_to_depth=2,
        num_heads=4,
        embed_dim=256,
        text_proj_dim=128,
        pool_heads=4,
        text_positions=_SHAPES_TEXT_POSITIONS,
    )
  if size == "shapes_unet":
    # (ours) The plain U-Net beside the `shapes` Efficient U-Net at a similar parameter count
    # (7.8M vs 8.1M) and the same conditioning (embedding, text projection, heads, token
    # positions). Widths 32/64/128/160 at 32/16/8/4: the Efficient U-Net's 64 (stem) / 128 / 192
    # at 16/8/4, with a full-resolution level where it pixel-unshuffles. Self + text attention
    # at 8 and 4 (and the middle block): where the Efficient U-Net attends to the text (8, 4)
    # and to itself (4); the plain block cannot attend to the text without self-attention.
    # One res block per level (the up path has two): two cost 10.9M params.
    return _unet(
        image_size=32,
        base_channels=32,
        channel_mult=(1, 2, 4, 5),
        num_res_blocks=1,
        attn_resolutions=(8, 4),
        num_heads=4,
        head_dim=None,
        embed_dim=256,
        text_proj_dim=128,
        pool_heads=4,
        text_positions=_SHAPES_TEXT_POSITIONS,
    )
  if size == "bench":
    return _unet(
        image_size=64,
        base_channels=64,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=2,
        attn_resolutions=(32, 16, 8),
        num_heads=4,
        head_dim=32,
        embed_dim=256,
        text_proj_dim=256,
        pool_heads=4,
    )
  raise ValueError(f"unknown size {size!r} for stage 'base64'; allowed: {SIZES}")


def _sr(stage: str, size: str) -> ml_collections.ConfigDict:
  self_attn = stage == "sr256"  # F.3 (SR1024) removes self-attention, keeps text attention
  if size == "paper":
    # App. F.2 / F.3: channels 128/256/512/1024, strides 2, res blocks 2/4/8/8, attention
    # (8 heads) with text in the last block. Trained on 64->256 crops at every stage.
    # Text: no shared projection, the cross-attention layers read T5-XXL directly (ours).
    return _efficient(
        image_size=256, self_attention=(False, False, False, self_attn), text_proj_dim=None
    )
  if size == "tiny":
    # sr1024's tiny also exercises space_to_depth (16x16 -> 8x8x24) and the no-projection
    # text path; sr256's exercises the shared text projection at full resolution.
    return _efficient(
        image_size=16,
        channels=(8, 16),
        num_res_blocks=(1, 2),
        strides=(2, 2),
        self_attention=(False, self_attn),
        text_cross_attention=(False, True),
        stem_channels=8,
        num_heads=2,
        embed_dim=32,
        text_proj_dim=16 if self_attn else None,
        pool_heads=2,
        norm_groups=4,
        space_to_depth=1 if self_attn else 2,
    )
  if size == "shapes":
    # 32->64 (sr256) demo: pixel-unshuffle by 4, so the 64x64x6 input runs at 16x16x96.
    return _efficient(
        image_size=64,
        channels=(96, 128),
        num_res_blocks=(2, 3),
        strides=(2, 2),
        self_attention=(False, self_attn),
        text_cross_attention=(False, True),
        stem_channels=64,
        space_to_depth=4,
        num_heads=4,
        embed_dim=256,
        text_proj_dim=128,
        pool_heads=4,
        text_positions=_SHAPES_TEXT_POSITIONS,
    )
  raise ValueError(f"unknown size {size!r} for stage {stage!r}; allowed: paper, tiny, shapes")


def get_model_config(stage: str, size: str) -> ml_collections.ConfigDict:
  """The network config for a cascade stage at a named size (see the module docstring)."""
  if stage == "base64":
    return _base64(size)
  if stage in ("sr256", "sr1024"):
    return _sr(stage, size)
  raise ValueError(f"unknown stage {stage!r}; allowed: {STAGES}")
