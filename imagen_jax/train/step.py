"""One pure training step for one cascade stage (Imagen §2, App. A, D.2).

`train_step(state, batch, rng, text_params) -> (state, metrics)`:
  1. rng <- fold_in(rng, state.step): every random draw is a function of (seed, step) only, so a
     resumed run draws exactly what the uninterrupted run would have drawn.
  2. text: `text_emb [B, L, D]` from the frozen encoder (`stop_gradient`; its params are an
     argument, neither trained nor in the optimizer state) unless the batch carries cached
     `text_emb` (`Stage.text_embeddings`); with probability `text.drop_prob` (0.1, §2.2) an
     example's text becomes the null text of classifier-free guidance (`Stage.drop_text`).
  3. t ~ U(0, 1) [B], logsnr = schedule(t), eps ~ N(0, I) [B, H, W, C],
     z_t = alpha x0 + sigma eps (App. A).
  4. SR stages: the low-res image `[B, h, w, C]` is upsampled to `[B, H, W, C]` and noise
     augmented at aug_level ~ U(lo, hi) per example (§2.4, D.2; `Stage.condition`); the net
     sees aug_level.
  5. loss = mean over the batch of `diffusion.losses.diffusion_loss` (MSE in the target space;
     eps in the paper), weighted per example by `train.loss_weighting` (`none`: the paper's
     plain loss; `min_snr`: min(SNR, gamma) / SNR for eps, Hang et al. 2023;
     `losses.loss_weights`); optax update (global-norm clipping per config); EMA update.
  6. With `train.grad_accum_steps = k` > 1 the batch `[B]` (B = `train.global_batch_size`, the
     optimizer step's batch) is split into k microbatches of B / k, every random draw above
     made for the whole batch first; their gradients are averaged in a `lax.scan`
     (`accumulate_grads`) before the one optax update: the update of the batch of B, with one
     microbatch's activations in memory. Steps, EMA, data position, logging and checkpoints all
     count optimizer steps.
  7. A non-finite loss or gradient norm leaves params, EMA and optimizer state unchanged
     (`finite = 0` in the metrics); the trainer stops or goes on per `train.nonfinite`.

The contract of docs/interfaces.md names `train_step(state, batch, rng)`; the frozen text
params are the one extra argument (closing over them would bake gigabytes of T5 weights into
the compiled program as constants). `Trainer` binds them.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from imagen_jax.diffusion import forward, losses
from imagen_jax.parallel import ready
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.stage import Stage
from imagen_jax.train.settings import StepSettings
from imagen_jax.train.state import TrainState


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params, in float32 (the paper does not state the
  decay; `train.ema_decay`)."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(jnp.float32) - e), ema, params)


def microbatch(tree: Any, j: jax.Array, k: int) -> Any:
  """Microbatch j of k of `[B, ...]` leaves: `[B / k, ...]`, the examples j, j + k, j + 2k, ...

  Strided, not blocked: each device's contiguous block of the batch (split over the mesh's
  batch axes) holds B / (k * shards) examples of every microbatch, so taking one moves no data
  between devices (`[B / k, k, ...]` indexed on its unsharded axis 1).
  """

  def take(x):
    b = x.shape[0]
    return jax.lax.dynamic_index_in_dim(
        x.reshape((b // k, k) + x.shape[1:]), j, axis=1, keepdims=False
    )

  return jax.tree.map(take, tree)


def accumulate_grads(
    loss_fn: Callable, params: Any, examples: dict, dropout_key: jax.Array, k: int
) -> tuple[jax.Array, Any]:
  """(mean loss, mean gradient) of the batch `examples` `[B, ...]` over k microbatches.

  loss_fn(params, microbatch, dropout_key) -> mean loss of the microbatch `[B / k, ...]`. With
  equal microbatches, mean_B(loss) = (1 / k) sum_j mean_{B/k}(loss_j), so the k-step
  `lax.scan` of `value_and_grad` gives the big batch's loss and gradient (to float32
  summation order) with one microbatch's activations live. The gradient sum is carried in the
  params' dtype and layout (float32 storage). Dropout draws its own mask per microbatch
  (`fold_in(dropout_key, j)`).
  """
  grad_fn = jax.value_and_grad(loss_fn)

  def body(carry, j):
    loss_sum, grad_sum = carry
    mb = jax.tree.map(
        lambda x: nn.with_logical_constraint(x, ("activation_batch",) + (None,) * (x.ndim - 1)),
        microbatch(examples, j, k),
    )
    loss, grads = grad_fn(params, mb, jax.random.fold_in(dropout_key, j))
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), jnp.arange(k))
  return loss_sum / k, jax.tree.map(lambda g: g / k, grad_sum)


def make_train_step(
    *,
    stage: Stage,
    settings: StepSettings,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    encode_tokens: Callable | None,
) -> Callable:
  """Builds the pure step for `stage` (not jitted; see `jit_train_step`).

  Args:
    stage: the stage layer (network, schedule, target, conditioning).
    settings: the step's settings, read from the config once (`StepSettings.from_config`):
      the SR augmentation range, text dropout, EMA decay, loss weighting, accumulation.
    tx, lr_schedule: from `train.optim.make_optimizer`.
    encode_tokens: `(params, ids [B, L], mask [B, L]) -> emb [B, L, D]`, the frozen encoder;
      None when batches carry cached `text_emb`.
  """
  aug_lo, aug_hi = settings.aug_range
  drop_prob = settings.drop_prob
  decay = settings.ema_decay
  weighting, gamma = settings.loss_weighting, settings.min_snr_gamma
  accum = settings.grad_accum_steps

  def micro_loss(params, mb: dict, dropout_key, text_params) -> jax.Array:
    """The mean loss of one (micro)batch whose random draws are already in `mb`."""
    x0 = mb["image"].astype(jnp.float32)
    emb, mask = stage.text_embeddings(mb, encode_tokens, text_params)
    emb, mask = stage.drop_text(emb, mask, mb["keep"])
    cond = stage.condition(
        emb, mask, mb.get("lowres"), aug_level=mb.get("aug"), aug_noise=mb.get("aug_noise")
    )
    logsnr = stage.schedule.logsnr_fn(mb["t"])
    z_t = forward.q_sample(x0, logsnr, mb["noise"])
    weights = losses.loss_weights(logsnr, weighting=weighting, gamma=gamma, space=stage.target)
    pred = stage.model.apply(
        {"params": params},
        z_t,
        logsnr,
        cond["text_emb"],
        cond["text_mask"],
        lowres=cond.get("lowres"),
        aug_level=cond.get("aug_level"),
        train=True,
        rngs={"dropout": dropout_key},
    )
    per_example = losses.diffusion_loss(
        pred, x0=x0, noise=mb["noise"], z_t=z_t, logsnr=logsnr, target=stage.target, weights=weights
    )
    return jnp.mean(per_example)

  def train_step(
      state: TrainState, batch: dict, rng: jax.Array, text_params: Any
  ) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(rng, state.step)
    k_t, k_noise, k_aug, k_aug_noise, k_drop, k_dropout = jax.random.split(rng, 6)
    shape = batch["image"].shape
    b = shape[0]
    # Every per-example draw is made for the whole batch, so k microbatches see exactly the
    # draws of the one big batch (the same update, `accumulate_grads`).
    draws = dict(
        keep=jax.random.uniform(k_drop, (b,)) >= drop_prob,
        t=jax.random.uniform(k_t, (b,), jnp.float32),
        noise=jax.random.normal(k_noise, shape, jnp.float32),
    )
    if stage.is_sr:
      draws["aug"] = jax.random.uniform(k_aug, (b,), jnp.float32, aug_lo, aug_hi)
      draws["aug_noise"] = jax.random.normal(k_aug_noise, shape, jnp.float32)
    examples = {**batch, **draws}
    if accum == 1:
      loss, grads = jax.value_and_grad(micro_loss)(state.params, examples, k_dropout, text_params)
    else:
      loss, grads = accumulate_grads(
          lambda p, mb, key: micro_loss(p, mb, key, text_params),
          state.params,
          examples,
          k_dropout,
          accum,
      )
    keep = draws["keep"]
    grad_norm = optax.global_norm(grads)
    # Named scopes: the compiled HLO attributes this work to them (parallel.hlo_breakdown).
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    with jax.named_scope("ema"):
      ema = ema_update(state.ema_params, params, decay)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_old(params, state.params),
        ema_params=keep_old(ema, state.ema_params),
        opt_state=keep_old(opt_state, state.opt_state),
    )
    metrics = dict(
        loss=loss,
        grad_norm=grad_norm,
        lr=lr_schedule(state.step),
        finite=finite.astype(jnp.int32),
        text_kept=jnp.mean(keep.astype(jnp.float32)),
    )
    return new_state, metrics

  return train_step


def jit_train_step(
    step_fn: Callable,
    *,
    mesh,
    rules,
    state_shardings: TrainState,
    batch_shardings: dict,
    text_shardings: Any,
    constrain_activations: bool = False,
) -> ready.ReadyJit:
  """The train step jitted on `mesh` (`parallel.sharding.mesh_jit`) with explicit in/out
  shardings and the state donated (updated in place). With `constrain_activations` the
  networks' activation constraints apply; without, XLA propagates layouts from the in/out
  shardings (params on fsdp / tensor, batch on (data, fsdp)). Both compile and train on any
  data x fsdp x tensor mesh (tests/test_tensor_parallel.py).
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return sharding_lib.mesh_jit(
      step_fn,
      mesh,
      rules,
      name="train_step",
      in_shardings=(state_shardings, batch_shardings, replicated, text_shardings),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
      constrain_activations=constrain_activations,
  )
