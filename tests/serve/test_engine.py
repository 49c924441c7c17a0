"""kv-serve-v0 engine rules on hand-built cases with exact outcomes (docs/serving.md section 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.serve import actions, engine, latency, workload
from kvjax.serve.build import build_state
from kvjax.serve.env import ServeEnv, make, validate_params
from kvjax.serve.types import (
    LOADING,
    OFFLOADING,
    RUNNING,
    TRT,
    WAITING,
    ServeConfig,
)

CFG = ServeConfig(max_requests=8, max_segments=2, iterations_per_step=1)


def decoding(prompt, generated, **row):
    """A running request past its prefill (its KV: prompt + generated tokens), 100 to output."""
    return dict(
        status=RUNNING,
        prompt=prompt,
        generated=generated,
        computed=prompt + generated,
        target=prompt,
        output_len=100,
        first_token=0.0,
        last_token=0.0,
        **row,
    )


def small_params(**over):
    _, p = make("toy", arrival_rate=1.0, **over)
    return p


def iterate(state, params, cfg=CFG, n=1):
    f = jax.jit(engine.iterate, static_argnums=2)
    for _ in range(n):
        state = f(state, params, cfg)
    return state


def test_preempted_request_is_prepended_and_recomputes_prompt_plus_generated():
    p = small_params(gpu_pool_tokens=160)  # 10 blocks
    s = build_state(
        p,
        CFG,
        requests=[
            decoding(64, 16, run_key=0),
            decoding(60, 20, run_key=1),
            dict(status=WAITING, prompt=32, output_len=4, queue_key=5),
        ],
        run_counter=2,
    )
    assert int(engine.memory(s, p)["free"]) == 0
    s1 = iterate(s, p)
    r = s1.requests
    # The last-scheduled request is the victim; the first decodes.
    assert int(r.status[0]) == RUNNING and int(r.computed[0]) == 81 and int(r.generated[0]) == 17
    assert int(r.status[1]) == WAITING
    assert int(r.computed[1]) == 0 and int(r.target[1]) == 60 + 20
    assert int(r.queue_key[1]) < int(r.queue_key[2])  # prepended
    assert int(r.preemptions[1]) == 1
    assert int(s1.metrics.preemptions) == 1 and int(s1.metrics.recomputed_tokens) == 80
    # An iteration that preempts admits nothing (C would have fitted in the freed blocks).
    assert int(r.status[2]) == WAITING
    expected = p.t_cpu + max(p.t_weights, p.lin_a + p.lin_b * 1) + p.attn_decode * 80
    np.testing.assert_allclose(float(s1.clock), expected, rtol=1e-6)
    # Next iteration: the victim heads the queue but needs 5 blocks with 4 free; admission
    # stops there (FCFS), so C waits too.
    s2 = iterate(s1, p)
    assert int(s2.requests.status[1]) == WAITING and int(s2.requests.status[2]) == WAITING
    assert int(engine.memory(s2, p)["free"]) == 4


def test_readmitted_victim_reprefills_prompt_plus_generated():
    p = small_params(gpu_pool_tokens=4096)
    s = build_state(
        p,
        CFG,
        requests=[
            dict(
                status=WAITING,
                prompt=60,
                generated=20,
                target=80,
                queue_key=-1,
                output_len=100,
                first_token=0.0,
                last_token=0.0,
                preemptions=1,
            ),
        ],
    )
    s1 = iterate(s, p)
    r = s1.requests
    assert int(r.status[0]) == RUNNING and int(r.computed[0]) == 80
    assert int(r.generated[0]) == 21  # the recompute's prefill emits the next token
    assert int(s1.metrics.prefill_tokens) == 80
    pairs = 80 * (0 + 40)
    expected = p.t_cpu + max(p.t_weights, p.lin_a + p.lin_b * 80) + p.attn_prefill * pairs
    np.testing.assert_allclose(float(s1.clock), expected, rtol=1e-6)


@pytest.mark.parametrize("cached", [True, False])
def test_prefix_hit_skips_the_cached_tokens(cached):
    p = small_params(gpu_pool_tokens=65536)
    s = build_state(
        p,
        CFG,
        requests=[
            dict(status=WAITING, prompt=600, segment=0, prefix_len=512, output_len=5),
        ],
        segments=[dict(tokens=512, on_gpu=cached)],
    )
    s1 = iterate(s, p)
    r, m = s1.requests, s1.metrics
    assert int(r.status[0]) == RUNNING and int(r.computed[0]) == 600
    assert int(r.generated[0]) == 1 and float(r.first_token[0]) == float(s1.clock)
    assert int(r.attached[0]) == 0 and bool(s1.segments.on_gpu[0])
    hit = 512 if cached else 0
    assert int(m.hit_tokens) == hit and int(m.prompt_tokens) == 600
    assert int(m.prefill_tokens) == 600 - hit
    c = 600 - hit
    expected = (
        p.t_cpu + max(p.t_weights, p.lin_a + p.lin_b * c) + p.attn_prefill * c * (hit + c / 2)
    )
    np.testing.assert_allclose(float(s1.clock), expected, rtol=1e-6)
    # Either way the segment now holds 32 blocks and the request its 6 private ones.
    mem = engine.memory(s1, p)
    assert int(mem["cached"]) == 32 and int(mem["used"]) == 6


def test_unreferenced_segments_are_evicted_lru_lowest_priority_first():
    p = small_params(gpu_pool_tokens=16 * 40)  # 40 blocks
    cfg = ServeConfig(max_requests=8, max_segments=3, iterations_per_step=1)
    s = build_state(
        p,
        cfg,
        requests=[
            dict(status=WAITING, prompt=16 * 30, output_len=3),  # needs 30 blocks
        ],
        segments=[
            dict(tokens=16 * 10, on_gpu=True, last_access=1.0, priority=1),
            dict(tokens=16 * 10, on_gpu=True, last_access=0.5, priority=1),  # LRU
            dict(tokens=16 * 10, on_gpu=True, last_access=0.1, priority=3),  # oldest, kept
        ],
        clock=2.0,
    )
    s1 = iterate(s, p, cfg)
    assert int(s1.requests.status[0]) == RUNNING
    # 10 free + 10 evicted (the least recent of the priority-1 segments) covers 30 - 10 ... 30
    np.testing.assert_array_equal(np.asarray(s1.segments.on_gpu), [False, False, True])


def test_pinned_segment_is_not_evicted():
    p = small_params(gpu_pool_tokens=16 * 20)
    s = build_state(
        p,
        CFG,
        requests=[dict(status=WAITING, prompt=16 * 15, output_len=3)],
        segments=[dict(tokens=16 * 10, on_gpu=True, pinned_until=5.0)],
        clock=1.0,
    )
    s1 = iterate(s, p)
    assert bool(s1.segments.on_gpu[0]) and int(s1.requests.status[0]) == WAITING


def test_offload_then_load_back_over_pcie():
    cfg = ServeConfig(max_requests=8, max_segments=2, iterations_per_step=3)
    env, p = make(
        "toy",
        arrival_rate=1.0,
        num_prefixes=0,
        config=dict(max_requests=8, max_segments=2, iterations_per_step=3),
    )
    s = build_state(
        p,
        env.config,
        requests=[
            decoding(150, 10),
        ],
    )
    a = env.noop_action()
    a["commands"] = a["commands"].at[0].set(actions.encode_command("offload", 0, env.config))
    s_off = actions.apply(s, a, p, env.config)
    t = float(latency.transfer_time(p, 10))
    np.testing.assert_allclose(t, 10 * 16 * 131072 / 50e9, rtol=1e-6)
    assert int(s_off.requests.status[0]) == OFFLOADING
    np.testing.assert_allclose(float(s_off.requests.xfer_done[0]), t, rtol=1e-6)
    s1 = iterate(s_off, p, cfg)  # idle until the copy completes (an idle iteration >= t_cpu)
    np.testing.assert_allclose(float(s1.clock), max(t, float(p.t_cpu)), rtol=1e-6)
    s2 = iterate(s1, p, cfg)  # swapped -> admitted -> loading
    assert int(s2.requests.status[0]) == LOADING
    np.testing.assert_allclose(float(s2.requests.xfer_done[0]), float(s1.clock) + t, rtol=1e-6)
    assert int(engine.memory(s2, p)["cpu_used"]) == 10
    s3 = iterate(s2, p, cfg)  # loaded -> decodes, KV intact
    r = s3.requests
    assert int(r.status[0]) == RUNNING and int(r.computed[0]) == 161
    assert int(r.generated[0]) == 11 and int(s3.metrics.recomputed_tokens) == 0
    assert int(engine.memory(s3, p)["cpu_used"]) == 0
    assert int(s_off.metrics.offloads) == 1


def test_trt_reserves_max_tokens_and_never_preempts():
    scenario = dict(
        arrival_rate=30.0, gpu_pool_tokens=16384, horizon=20.0, config=dict(max_requests=32)
    )
    env, p = make("toy", engine="trt", **scenario)
    env_vllm, pv = make("toy", engine="vllm", **scenario)
    assert int(p.engine) == TRT

    def episode(env, params):
        _, s = env.reset_env(jax.random.PRNGKey(3), params)

        def body(s, _):
            s = env.step_env(None, s, env.noop_action(), params)[1]
            return s, engine.memory(s, params)["free"]

        return jax.lax.scan(body, s, None, length=120)

    s_trt, free_trt = jax.jit(episode, static_argnums=0)(env, p)
    s_vllm, _ = jax.jit(episode, static_argnums=0)(env_vllm, pv)
    assert int(s_vllm.metrics.preemptions) > 0  # the same stream does preempt under vLLM
    assert int(s_trt.metrics.preemptions) == 0 and int(free_trt.min()) >= 0
    assert int(s_trt.metrics.finished) > 0


def test_sglang_retracts_fewest_decoded_first():
    p = small_params(gpu_pool_tokens=160, engine="sglang")
    s = build_state(
        p,
        CFG,
        requests=[
            decoding(60, 20, run_key=0),  # fewer decoded: victim
            decoding(40, 40, run_key=1),
        ],
        run_counter=2,
    )
    s1 = iterate(s, p)
    assert int(s1.requests.status[0]) == WAITING and int(s1.requests.status[1]) == RUNNING
    assert float(s1.new_token_ratio) == pytest.approx(float(p.sglang_ratio_init))


def test_agent_priority_picks_the_victim():
    p = small_params(gpu_pool_tokens=160)
    rows = [
        decoding(64, 16, run_key=0, priority=0),
        decoding(60, 20, run_key=1, priority=3),
    ]
    s1 = iterate(build_state(p, CFG, requests=rows, run_counter=2), p)
    # The first-admitted request has the lowest retention priority: it is the victim.
    assert int(s1.requests.status[0]) == WAITING and int(s1.requests.status[1]) == RUNNING


def test_client_timeout_is_the_only_drop_and_counted():
    p = small_params(gpu_pool_tokens=64, client_timeout=1.0)  # 4 blocks: the prompt never fits
    s = build_state(p, CFG, requests=[dict(status=WAITING, prompt=200, output_len=3)])
    s1 = iterate(s, p, n=3)
    assert int(s1.metrics.timed_out) == 1 and int(s1.requests.status[0]) == 0
    assert float(s1.clock) >= 1.0


def test_arrivals_wait_behind_the_pointer_when_the_table_is_full():
    env, p = make("toy", arrival_rate=200.0, config=dict(max_requests=4, iterations_per_step=4))
    _, s = env.reset_env(jax.random.PRNGKey(0), p)
    s = jax.jit(env.step_env)(None, s, env.noop_action(), p)[1]
    # The table is full and the next request has arrived but waits behind the pointer.
    assert int(jnp.sum(s.requests.status != 0)) == 4
    assert float(s.next_arrival) <= float(s.clock)
    assert int(s.metrics.arrived) == int(s.next_index) and int(s.metrics.timed_out) == 0
    # Requests in the table keep their stream arrival times (the wait counts in their TTFT).
    stream = workload.request_stream(s.seed, int(s.next_index) + 1, p)
    live = np.asarray(s.requests.status) != 0
    idx = np.asarray(s.requests.index)[live]
    np.testing.assert_array_equal(np.asarray(s.requests.arrival)[live], stream["arrival"][idx])
    assert float(s.next_arrival) == stream["arrival"][int(s.next_index)]


def test_empty_engine_jumps_to_the_next_arrival():
    env, p = make("toy", arrival_rate=0.5, config=dict(iterations_per_step=1))
    _, s = env.reset_env(jax.random.PRNGKey(1), p)
    t0 = float(s.next_arrival)
    s1 = jax.jit(env.step_env)(None, s, env.noop_action(), p)[1]
    np.testing.assert_allclose(float(s1.clock), t0, rtol=1e-6)


def test_iterations_stop_at_the_horizon():
    env, p = make("toy", load=0.5, horizon=2.0)
    _, s = env.reset_env(jax.random.PRNGKey(2), p)
    step = jax.jit(env.step_env)
    for _ in range(400):
        s = step(None, s, env.noop_action(), p)[1]
    c = float(s.clock)
    s2 = step(None, s, env.noop_action(), p)[1]
    assert c >= 2.0 and float(s2.clock) == c
    assert isinstance(env, ServeEnv)


def test_an_agentic_session_reads_its_history_call_after_call():
    """One session alone in a big engine: each call after the first hits exactly the previous
    call's published history; the first inserts the system prompt (cold) and hits nothing."""
    env, p = make(
        "toy", workload="agentic", arrival_rate=0.004, horizon=400.0, gpu_pool_tokens=2**24
    )
    cfg = env.config
    keys = jax.random.split(jax.random.PRNGKey(0), 2048)
    seeds = jax.vmap(lambda k: env.reset(k, p)[1].seed)(keys)
    first = jax.vmap(lambda s: workload.draw_session(s, jnp.arange(2), p, cfg))(seeds)
    t0, t1 = np.cumsum(np.asarray(first["gap"]), axis=1).T
    b = int(np.flatnonzero((t0 < 40.0) & (t1 > 400.0))[0])
    _, state = env.reset(keys[b], p)
    s = jax.tree.map(lambda x: np.asarray(x)[b], first)
    seed = state.seed
    cap = int(p.max_model_len - p.max_tokens)
    prompts, hits, prompt, published = [], [], int(s["prompt"][0]), 0
    for t in range(int(s["turns"][0])):
        c = jax.tree.map(int, workload.draw_call(seed, 0, t, p, cfg))
        prompts.append(prompt)
        hits.append(published)
        published = (prompt + c["output_len"] - 1) // 16 * 16
        prompt = prompt + c["output_len"] + c["new_tokens"]
        if prompt > cap:
            break
    step = jax.jit(lambda st: engine.run(st, p, cfg))
    while float(state.clock) < float(p.horizon):
        state = step(state)
    m = state.metrics
    assert int(m.arrived) == int(m.finished) == len(prompts) >= 2
    assert int(m.prompt_tokens) == sum(prompts)
    assert int(m.hit_tokens) == sum(hits)
    keys_held = set(np.asarray(state.segments.key)[np.asarray(state.segments.valid)].tolist())
    assert {workload.history_key(0, t, cfg) for t in range(len(prompts))} <= keys_held


@pytest.mark.parametrize(
    "engine_name",
    [
        "vllm",
        pytest.param("sglang", marks=pytest.mark.slow),
        pytest.param("trt", marks=pytest.mark.slow),
    ],
)
def test_static_engine_equals_the_traced_engine(engine_name):
    """make(engine=...) traces only that engine's rules (ServeConfig.engine); step by step it
    is bit-identical to the traced form (config engine=None, every engine's rules evaluated
    and selected) under memory pressure and random actions (priorities, commands)."""
    scenario = dict(
        engine=engine_name,
        load=1.5,
        gpu_pool_tokens=12000,
        horizon=6.0,
        config=dict(max_requests=16, iterations_per_step=8),
    )
    env, p = make("toy", **scenario)
    env_traced, p_traced = make(
        "toy", **{**scenario, "config": {**scenario["config"], "engine": None}}
    )
    assert env.config.engine == engine_name and env_traced.config.engine is None
    chex_equal = lambda a, b: jax.tree_util.tree_all(  # noqa: E731
        jax.tree_util.tree_map(lambda x, y: bool(jnp.array_equal(x, y, equal_nan=True)), a, b)
    )
    space = env.action_space(p)

    def episode(env, params):
        _, s = env.reset_env(jax.random.PRNGKey(11), params)

        def body(s, k):
            s = env.step_env(None, s, space.sample(k), params)[1]
            return s, s

        return jax.lax.scan(body, s, jax.random.split(jax.random.PRNGKey(2), 60))[1]

    static = jax.jit(episode, static_argnums=0)(env, p)
    traced = jax.jit(episode, static_argnums=0)(env_traced, p_traced)
    assert chex_equal(static, traced)
    assert int(static.metrics.finished[-1]) > 0
    if engine_name != "trt":
        assert int(static.metrics.preemptions[-1]) + int(static.metrics.offloads[-1]) > 0


def test_static_engine_config_is_checked():
    env, p = make("toy", engine="sglang")
    assert env.config.engine == "sglang"
    with pytest.raises(ValueError, match="config's engine 'sglang'"):
        validate_params(p.replace(engine=jnp.int32(0)), env.config)
    with pytest.raises(ValueError, match=r"\['vllm', 'sglang', 'trt'\] or None"):
        make("toy", config=dict(engine="tgi"))
    with pytest.raises(ValueError, match="config's engine 'vllm'"):
        make("toy", engine="trt", config=dict(engine="vllm"))
    env, p = make("toy", engine="trt", config=dict(engine=None))
    assert env.config.engine is None and int(p.engine) == TRT


@pytest.mark.parametrize("method", ["pairwise", "sort"])
def test_queue_prefix_sums_equal_a_prefix_sum_per_queue(method):
    """One prefix sum in the joint order gives the running queue's and the waiting queue's
    sums: each equals the sum over that queue's earlier rows alone."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = 24
        status = rng.choice([0, 1, 2, 3], n)  # 1 running, 2 waiting, others neither
        running, waiting = jnp.asarray(status == 1), jnp.asarray(status == 2)
        run_key = jnp.asarray(rng.permutation(n), jnp.int32)
        queue_key = jnp.asarray(rng.integers(-5, 5, n), jnp.int32)
        keys = (jnp.where(running, 0, 1), jnp.where(running, run_key, queue_key))
        order = engine.ops.order(keys, running | waiting, method)
        a = jnp.asarray(rng.integers(0, 99, n), jnp.int32)
        b = jnp.asarray(rng.integers(0, 99, n), jnp.int32)
        got_run, got_wait = engine.queue_prefix_sums(order, running, waiting, a, b)
        for mask, key, value, got in (
            (status == 1, np.asarray(run_key), np.asarray(a), got_run),
            (status == 2, np.asarray(queue_key), np.asarray(b), got_wait),
        ):
            rows = np.flatnonzero(mask)
            for i in rows:
                ahead = [j for j in rows if (key[j], j) < (key[i], i)]
                assert int(got[i]) == int(value[ahead].sum())


# -- request transitions written once (engine.fresh_request, engine.recompute_preempt) ----------
# The fields that name a request's call (set by whoever places it); every other field is
# progress, which fresh_request resets.
CALL_FIELDS = {
    "status",
    "index",
    "turn",
    "arrival",
    "prompt",
    "output_len",
    "max_tokens",
    "segment",
    "segment_up",
    "prefix_len",
    "publish",
    "publish_len",
}


def test_default_priority_is_the_middle_level_rounded_down():
    levels = {1: 0, 2: 0, 3: 1, 4: 1, 5: 2}
    for L, want in levels.items():
        assert ServeConfig(priority_levels=L).default_priority == want
    p = small_params()
    s = engine.empty_state(jnp.zeros(2, jnp.uint32), p, CFG)
    assert np.all(np.asarray(s.segments.priority) == CFG.default_priority)


def test_fresh_request_resets_every_progress_field_on_its_rows_only():
    p = small_params()
    s = build_state(
        p,
        CFG,
        requests=[
            decoding(64, 16, run_key=3, priority=3, attached=0, preemptions=2, recomputed=40),
            decoding(60, 20, run_key=4, priority=0, hit_tokens=32, cpu_blocks=5),
        ],
        segments=[dict(tokens=32, on_gpu=True)],
    )
    fresh = engine.fresh_request(CFG, prompt=jnp.int32(100), queue_key=jnp.int32(7))
    # Every field of the table is either the call's or reset here.
    assert set(fresh) | CALL_FIELDS == set(s.requests.__dataclass_fields__)
    assert not set(fresh) & CALL_FIELDS
    rows = jnp.arange(CFG.max_requests) == 0
    r = engine.set_rows(s.requests, rows, fresh)
    want = dict(
        attached=-1,
        computed=0,
        target=100,
        generated=0,
        queue_key=7,
        run_key=0,
        priority=CFG.default_priority,
        first_token=-1.0,
        last_token=-1.0,
        preemptions=0,
        recomputed=0,
        hit_tokens=0,
        xfer_done=0.0,
        cpu_blocks=0,
    )
    for k, v in want.items():
        assert getattr(r, k)[0] == v, k
        # dtypes kept, other rows untouched
        assert getattr(r, k).dtype == getattr(s.requests, k).dtype, k
        np.testing.assert_array_equal(getattr(r, k)[1:], getattr(s.requests, k)[1:], err_msg=k)
    # An empty table's rows are fresh rows holding no request (priority 0, never read).
    e = engine.empty_state(jnp.zeros(2, jnp.uint32), p, CFG).requests
    for k, v in engine.fresh_request(CFG, prompt=0).items():
        np.testing.assert_array_equal(getattr(e, k), 0 if k == "priority" else v, err_msg=k)


def test_recompute_preempt_frees_one_row_and_requeues_it_at_the_given_key():
    p = small_params(gpu_pool_tokens=4096)
    s = build_state(
        p,
        CFG,
        requests=[
            # 80 tokens computed, the first 32 held by segment 0: 48 to recompute
            decoding(64, 16, run_key=0, attached=0, queue_key=2, preemptions=1, recomputed=5),
            decoding(60, 20, run_key=1, attached=0),
        ],
        segments=[dict(tokens=32, on_gpu=True)],
    )
    rows = jnp.arange(CFG.max_requests) == 0
    r, lost = engine.recompute_preempt(s.requests, s.segments, rows, -3)
    np.testing.assert_array_equal(lost, [48] + [0] * (CFG.max_requests - 1))
    assert int(r.status[0]) == WAITING and int(r.queue_key[0]) == -3
    assert int(r.computed[0]) == 0 and int(r.attached[0]) == -1
    assert int(r.target[0]) == 64 + 16  # the prompt and every generated token again
    assert int(r.generated[0]) == 16  # its output so far is kept
    assert int(r.preemptions[0]) == 2 and int(r.recomputed[0]) == 5 + 48
    for k in s.requests.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(r, k)[1:], getattr(s.requests, k)[1:], err_msg=k)
    # Its private blocks are free; the segment stays, held by row 1.
    before, after = engine.memory(s, p), engine.memory(s.replace(requests=r), p)
    assert int(after["used"]) == int(before["used"]) - 3 and int(after["cached"]) == 2
