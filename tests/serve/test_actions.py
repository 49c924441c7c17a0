"""The agent's commands of kv-serve-v0 against the engine's own transitions (serve/actions.py)."""

import jax.numpy as jnp
import numpy as np

from kvjax.serve import actions, engine
from kvjax.serve.build import build_state
from kvjax.serve.env import make
from kvjax.serve.types import OFFLOADING, RUNNING, WAITING, ServeConfig

CFG = ServeConfig(max_requests=8, max_segments=2, max_commands=2, iterations_per_step=1)


def running(prompt, generated, **row):
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


def test_preempt_command_is_the_engines_recompute_preemption_at_the_head_of_the_queue():
    _, p = make("toy", arrival_rate=1.0)
    s = build_state(
        p,
        CFG,
        requests=[
            running(64, 16, run_key=0, attached=0),
            running(60, 20, run_key=1),
            dict(status=WAITING, prompt=32, output_len=4, queue_key=5),
        ],
        segments=[dict(tokens=32, on_gpu=True)],
        preempt_counter=4,
    )
    act = actions.noop_action(CFG)
    act["commands"] = jnp.asarray(
        [actions.encode_command("preempt", 0, CFG), actions.encode_command("offload", 1, CFG)],
        jnp.int32,
    )
    out = actions.apply(s, act, p, CFG)
    rows = jnp.arange(CFG.max_requests) == 0
    # The preempt (counter 4 -> 5) queues row 0 at -5; the offload after it row 1 at -6.
    want, lost = engine.recompute_preempt(s.requests, s.segments, rows, -5)
    for k in s.requests.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(out.requests, k)[0], getattr(want, k)[0], err_msg=k)
    assert int(lost[0]) == 80 - 32
    r = out.requests
    assert int(r.status[1]) == OFFLOADING and int(r.queue_key[1]) == -6
    assert int(r.preemptions[1]) == 1 and int(r.computed[1]) == 80  # its KV is copied, kept
    assert int(r.status[2]) == WAITING and int(r.queue_key[2]) == 5
    m = out.metrics
    assert int(m.agent_preemptions) == 1 and int(m.offloads) == 1
    assert int(m.recomputed_tokens) == 48 and int(m.preemptions) == 0  # engine's own: none
    assert int(out.preempt_counter) == 6 and int(m.invalid_commands) == 0
