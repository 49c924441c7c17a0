"""Flax actor-critic for kvjax: a permutation-equivariant slot encoder, autoregressive masked
action heads (one `distrax.Categorical` per entry of the action vector) and a value head.

Action ids follow the env: 0 = keep, 1 + k * S + slot for k in (evict, compress, swap_to_cpu).
Each of the `max_actions` heads scores keep (from the pooled context) and the three kinds for
every slot (a shared per-slot 3-logit layer), i.e. 1 + 3S logits, in that id order.

Sequential validity: the env applies the actions of one step in order, so head h is masked with
what is still valid after heads 0..h-1 (evict clears the slot, swap moves it off the GPU,
compress raises its precision; keep is always valid). The update is computed exactly from the
observation and the chosen prefix (`next_mask`), so a policy never wastes an action on a counted
no-op. Later heads also see, per slot, which kinds earlier heads chose there.

kv-serve-v0 (`ServeActorCritic`, last section): per-row encoders over the request and segment
tables and per-row categorical heads over the priority values; train/agents/ wraps both
networks with their action distributions.
"""

from __future__ import annotations

import chex
import distrax
import flax.linen as nn
import jax.numpy as jnp

from kvjax.cache.observations import GLOBAL_FEATURES, SLOT_FEATURES, Observation
from kvjax.cache.scenarios import random_words
from kvjax.serve.observations import GLOBAL_FEATURES as SERVE_GLOBALS
from kvjax.serve.observations import REQUEST_FEATURES, SEGMENT_FEATURES, ServeObservation

NEG = -1e9  # masked logit: probability exactly 0, entropy and log-probs stay finite
_ACTIVE = SLOT_FEATURES.index("active")
_INT8 = SLOT_FEATURES.index("int8")
_INT4 = SLOT_FEATURES.index("int4")
_REMAINING = GLOBAL_FEATURES.index("episode_remaining")


def exponentials(key: chex.PRNGKey, shape: tuple[int, ...]) -> chex.Array:
    """Standard exponential draws (float32 `shape`) from kvjax's counter-based generator: one
    threefry call seeds a hash of a counter (`kvjax.cache.scenarios.random_words`). With the race
    below, a head's draw is ~5x cheaper on CPU than distrax's threefry Gumbel noise, which was
    about half of a rollout."""
    bits = random_words(key, shape) >> 8  # 24 uniform bits
    return -jnp.log((bits.astype(jnp.float32) + 0.5) * (1.0 / (1 << 24)))  # u in (0, 1)


def sample_categorical(dist: distrax.Categorical, noise: chex.Array) -> chex.Array:
    """A draw from `dist` given standard exponentials `noise` (same shape as its logits): the
    exponential race argmax_i p_i / E_i picks i with probability p_i (the Gumbel-max trick with
    one log per logit instead of two). Masked ids (p = 0) can never win: keep always has p > 0."""
    return jnp.argmax(dist.probs / noise, axis=-1).astype(jnp.int32)


def _hits(action: chex.Array, S: int) -> chex.Array:
    """[3, S] bool: which (kind, slot) the action id names (all False for keep)."""
    ids = 1 + jnp.arange(3 * S).reshape(3, S)  # kind-major, like the action ids
    return ids == action


def next_slot_mask(slot_mask: chex.Array, precision: chex.Array, action: chex.Array, S: int):
    """`next_mask` on the kind-major part: `slot_mask` [3, S] (evict, compress, swap rows)."""
    hit = _hits(action, S)
    precision = precision + hit[1]
    gone = hit[0]  # evicted: nothing is valid on the slot any more
    off_gpu = hit[2]  # swapped: no compress / swap until it is back
    ev = slot_mask[0] & ~gone
    co = slot_mask[1] & ~gone & ~off_gpu & (precision < 2)
    sw = slot_mask[2] & ~gone & ~off_gpu
    return jnp.stack([ev, co, sw]), precision


def next_mask(mask: chex.Array, precision: chex.Array, action: chex.Array, S: int):
    """Validity after applying `action` (scalar id) to a state whose mask is `mask` [1 + 3S] and
    per-slot precision is `precision` [S] (int32). Returns (mask, precision)."""
    slot_mask, precision = next_slot_mask(mask[1:].reshape(3, S), precision, action, S)
    return jnp.concatenate([mask[:1], slot_mask.reshape(-1)]), precision


class PartsDense(nn.Module):
    """`nn.Dense` (same parameter names, shapes, initialisers and init draws) applied to an
    input given in parts: `kernel` rows are split by part, so the concatenation (and, for a part
    shared by many rows, the repeated product) is never materialised. Call `weights(n_in)`."""

    features: int
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def weights(self, n_in: int) -> tuple[chex.Array, chex.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (n_in, self.features))
        return kernel, self.param("bias", self.bias_init, (self.features,))


def _precision(slots: chex.Array) -> chex.Array:
    return (slots[..., _INT8] + 2.0 * slots[..., _INT4]).astype(jnp.int32)


class ActorCritic(nn.Module):
    """Slot encoder (a shared per-slot MLP over slot + global features, optional
    self-attention, masked mean/max pooling into a context); `max_actions` autoregressive
    heads; value head.

    `__call__(obs, actions)` scores the given actions (teacher forcing) and returns
    (logits [..., A, 1 + 3S] masked, value [...]). `sample` draws actions head by head.
    Both work on unbatched observations; vmap for batches.
    """

    max_actions: int = 3
    hidden: int = 32
    attention: bool = False
    num_heads: int = 2
    keep_bias: float = 4.5  # ~ log(3 * 32): P(keep) ~ 1/2 at initialisation

    def setup(self):
        h = self.hidden
        self.slot_mlp = [PartsDense(h), nn.Dense(h)]
        self.ctx = nn.Dense(h)
        if self.attention:
            self.attn = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=h)
        # Per head: 3 logits per slot from the slot embedding plus which kinds earlier heads
        # chose there; keep from the context plus how many earlier heads acted.
        self.slot_heads = [PartsDense(3) for _ in range(self.max_actions)]
        # Keep starts as likely as all 3S slot actions together: an untrained policy then
        # mostly leaves the cache alone instead of evicting at random, which learns faster.
        keep_bias = nn.initializers.constant(self.keep_bias)
        self.keep_heads = [nn.Dense(1, bias_init=keep_bias) for _ in range(self.max_actions)]
        self.value_mlp = nn.Dense(h)
        self.value_out = nn.Dense(1)

    def encode(self, obs: Observation):
        """-> per-slot embeddings [S, h], context [h], value (0 when no steps remain).

        Every slot sees its own features next to the global ones (memory pressure, queue), so
        one shared per-slot MLP already ranks slots in context; pooling gives the context."""
        active = obs.slots[:, _ACTIVE] > 0.5
        # First layer on [slot, global] features: the global part once, not once per slot.
        F = obs.slots.shape[-1]
        k, b = self.slot_mlp[0].weights(F + obs.globals.shape[-1])
        x = nn.relu(obs.slots @ k[:F] + (obs.globals @ k[F:] + b))
        x = nn.relu(self.slot_mlp[1](x))
        if self.attention:
            x = x + self.attn(x, mask=active[None, None, :] | ~jnp.any(active))
        n = jnp.maximum(jnp.sum(active), 1)
        mean = jnp.sum(jnp.where(active[:, None], x, 0.0), axis=0) / n
        mx = jnp.max(jnp.where(active[:, None], x, -1.0), axis=0)  # relu >= 0; -1 if none
        ctx = nn.relu(self.ctx(jnp.concatenate([mean, mx, obs.globals])))
        v = self.value_out(nn.relu(self.value_mlp(ctx)))[0]
        # An episode with no steps left earns nothing more: this makes bootstrapping truncated
        # episodes from info["final_observation"] exact (and not an untrained extrapolation).
        v = jnp.where(obs.globals[_REMAINING] > 0, v, 0.0)
        return x, ctx, v

    def slot_scores(self, e):
        """Each head's slot-embedding part of its per-slot logits, all heads in one product:
        [A, 3, S] (kind-major like the action ids), plus each head's (chosen kernel, bias)."""
        H = e.shape[-1]
        ws = [head.weights(H + 3) for head in self.slot_heads]
        k_e = jnp.concatenate([k[:H] for k, _ in ws], axis=1)  # [H, 3A]
        scores = jnp.einsum("sh,hk->ks", e, k_e).reshape(self.max_actions, 3, -1)
        return scores, [(k[H:], b) for k, b in ws]

    def head_logits(self, h: int, scores, ctx, chosen, slot_mask):
        """Masked logits [1 + 3S] of head h (keep is always valid); `chosen` [3, S] marks the
        kinds earlier heads chose on each slot, `slot_mask` [3, S] what is still valid."""
        k_c, b = scores[1][h]
        # chosen^T @ k_c as 3 broadcast products, kind-major: a K=3 matmul is a library call
        # per head that costs more on CPU than the whole per-slot MLP.
        per_kind = scores[0][h] + sum(k_c[j][:, None] * chosen[j] for j in range(3)) + b[:, None]
        keep = self.keep_heads[h](jnp.concatenate([ctx, jnp.sum(chosen, axis=1)]))
        per_kind = jnp.where(slot_mask, per_kind, NEG)
        return jnp.concatenate([keep, per_kind.reshape(-1)])  # id order: kind-major

    def _heads(self, obs: Observation, pick):
        """Run the heads in order; `pick(h, logits) -> action` chooses head h's action.
        Returns the per-head logits [A, 1 + 3S], actions [A] and the value."""
        e, ctx, v = self.encode(obs)
        S = e.shape[0]
        scores = self.slot_scores(e)
        slot_mask, prec = obs.action_mask[1:].reshape(3, S), _precision(obs.slots)
        chosen = jnp.zeros((3, S), jnp.float32)
        logits, acts = [], []
        for h in range(self.max_actions):  # static unroll over the (few) heads
            logits.append(self.head_logits(h, scores, ctx, chosen, slot_mask))
            a = pick(h, logits[-1])
            acts.append(a)
            slot_mask, prec = next_slot_mask(slot_mask, prec, a, S)
            chosen = chosen + _hits(a, S)
        return jnp.stack(logits), jnp.stack(acts), v

    def __call__(self, obs: Observation, actions: chex.Array):
        """Teacher-forced logits of every head for `actions` [A], and the value."""
        logits, _, v = self._heads(obs, lambda h, _: actions[h])
        return logits, v

    def sample(self, obs: Observation, key: chex.PRNGKey, greedy: bool = False):
        """Draw actions head by head -> (actions int32 [A], log_prob, entropy, value)."""
        noise = exponentials(key, (self.max_actions, obs.action_mask.shape[-1]))

        def pick(h, logits):
            d = distrax.Categorical(logits=logits)
            return d.mode().astype(jnp.int32) if greedy else sample_categorical(d, noise[h])

        logits, acts, v = self._heads(obs, pick)
        d = dists(logits)
        return acts, d.log_prob(acts).sum(), d.entropy().sum(), v


def dists(logits: chex.Array) -> distrax.Categorical:
    """The per-head categorical distributions of masked logits [..., A, n]."""
    return distrax.Categorical(logits=logits)


# -- kv-serve-v0 -------------------------------------------------------------------------------
# Rows that exist: a request row is in one of these states (EMPTY rows observe all zeros).
_ROW_STATES = tuple(
    REQUEST_FEATURES.index(k) for k in ("waiting", "running", "swapped", "transferring", "in_tool")
)
_TIME_FRAC = SERVE_GLOBALS.index("time_frac")


def squash(x: chex.Array) -> chex.Array:
    """sign(x) log(1 + |x|): ages over the SLO, preemption counts and iteration times reach the
    tens or hundreds while flags are 0/1; this keeps every input O(1) without statistics."""
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def request_rows(obs: ServeObservation) -> chex.Array:
    """bool [S]: which request rows hold a request (waiting, running, moving or in a tool gap)."""
    return jnp.sum(obs.requests[..., jnp.asarray(_ROW_STATES)], axis=-1) > 0.5


def segment_rows(obs: ServeObservation) -> chex.Array:
    """bool [G]: which segment rows are valid."""
    return obs.segments[..., SEGMENT_FEATURES.index("valid")] > 0.5


def _first_bias(value: float):
    """Bias initialiser: `value` for the first output, 0 for the others."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.zeros(shape, dtype).at[0].set(value)

    return init


class ServeActorCritic(nn.Module):
    """kv-serve-v0: a per-row encoder over the request table and one over the segment table
    (shared weights across rows, each row seeing the globals: permutation-equivariant), masked
    mean / max pooling of both tables plus the globals into a context, per-row categorical
    heads over the priority values 0..L (0 = leave the row's priority as it is) and a value
    head on the context. Commands are not produced (the agent always sends noop).

    `__call__(obs)` -> (request logits [S, L+1], segment logits [G, L+1], value); rows that do
    not exist get logits too - the agent zeroes their actions and drops their terms."""

    levels: int = 5  # priority values 0..L
    hidden: int = 32
    # Level 0 (leave the engine's priority) starts ~e^1 times likelier than each set level: an
    # untrained agent mostly keeps the engine default instead of reshuffling every row.
    keep_bias: float = 1.0

    def setup(self):
        h = self.hidden
        self.req_mlp = [PartsDense(h), nn.Dense(h)]
        self.seg_mlp = [PartsDense(h), nn.Dense(h)]
        self.ctx = nn.Dense(h)
        self.req_head = PartsDense(self.levels, bias_init=_first_bias(self.keep_bias))
        self.seg_head = PartsDense(self.levels, bias_init=_first_bias(self.keep_bias))
        self.value_mlp = nn.Dense(h)
        self.value_out = nn.Dense(1)

    def _rows(self, layers, rows, g):
        """Shared MLP over rows [n, F] with the globals g as a second input part."""
        F = rows.shape[-1]
        k, b = layers[0].weights(F + g.shape[-1])
        x = nn.relu(rows @ k[:F] + (g @ k[F:] + b))
        return nn.relu(layers[1](x))

    def __call__(self, obs: ServeObservation):
        g = squash(obs.globals)
        r_on, s_on = request_rows(obs), segment_rows(obs)
        xr = self._rows(self.req_mlp, squash(obs.requests), g)
        xs = self._rows(self.seg_mlp, squash(obs.segments), g)

        def pool(x, on):
            n = jnp.maximum(jnp.sum(on), 1)
            mean = jnp.sum(jnp.where(on[:, None], x, 0.0), axis=0) / n
            return mean, jnp.max(jnp.where(on[:, None], x, -1.0), axis=0)  # relu >= 0

        ctx = nn.relu(self.ctx(jnp.concatenate([*pool(xr, r_on), *pool(xs, s_on), g])))
        v = self.value_out(nn.relu(self.value_mlp(ctx)))[0]
        # Nothing is earned after the horizon: the value of a final observation is exactly 0,
        # which makes a truncated step's bootstrap exact (as in ActorCritic).
        v = jnp.where(obs.globals[_TIME_FRAC] < 1.0, v, 0.0)
        h = xr.shape[-1]
        heads = []
        for head, x in ((self.req_head, xr), (self.seg_head, xs)):
            k, b = head.weights(2 * h)
            heads.append(x @ k[:h] + (ctx @ k[h:] + b))
        return heads[0], heads[1], v
