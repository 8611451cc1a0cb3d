"""Turns at chunk boundaries: the order of the policy, and answers equal to a pass run alone.

The interleaving tests are deterministic: a guest pass runs at *every* chunk boundary of the host
and at every pause inside its chunks' forwards (so at each position an interleaving could put it),
on the host's thread, through the real ``Host``; every answer must equal the same pass run alone
to 1e-5, for every registered method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from app.cam import METHODS
from app.models.loading import LoadedModel
from app.models.registry import ModelRegistry
from app.pipeline.admission import SlotLimiter
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.passes import CamItem, CamOutcome, CamPlan, run_cam_pass, run_forward_pass
from app.pipeline.scheduling import Guest, Host, Priority, TurnRules
from app.settings import Settings
from tests.fixtures_models import build_tiny, build_tiny_vit, fixture_access, write_model

# ---------------------------------------------------------------------------- the policy


class Clock:
    """A clock that moves only when a test says that work took time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _guest(
    log: list[str],
    name: str,
    priority: Priority,
    clock: Clock | None = None,
    took: float = 0.0,
    callers: tuple[str, ...] = (),
) -> Guest:
    def run() -> None:
        log.append(name)
        if clock is not None:
            clock.now += took

    return Guest(priority, run, lambda: log.append(f"declined {name}"), callers=lambda: callers)


def _chunks(host: Host, log: list[str], count: int) -> None:
    """The host runs ``count`` chunks, with a boundary after each."""
    for number in range(count):
        log.append(f"chunk{number}")
        host.boundary()


def _slices(host: Host, log: list[str], clock: Clock, count: int, took: float = 1.0) -> None:
    """The host works ``count`` times for ``took`` seconds, pausing after each."""
    for number in range(count):
        log.append(f"s{number}")
        clock.now += took
        host.pause()


# A background host: its share of the model's time while interactive guests wait.


def test_a_background_host_keeps_its_share_of_the_time_in_seconds() -> None:
    """Share 0.8: after each interactive guest the host runs four times as long as it did, at
    its pauses, whatever its chunks are; then the next guest goes."""
    log: list[str] = []
    clock = Clock()
    host = Host("background", TurnRules(background_share=0.8), clock=clock)
    for name in "abc":
        host.offer(_guest(log, name, "interactive", clock, took=1.0))
    _slices(host, log, clock, 10)
    assert log == ["s0", "a", "s1", "s2", "s3", "s4", "b", "s5", "s6", "s7", "s8", "c", "s9"]
    assert host.yields == 3


@pytest.mark.parametrize(
    ("share", "expected"),
    [
        (0.5, ["s0", "a", "s1", "b", "s2", "c", "s3"]),
        (0.0, ["s0", "a", "b", "c", "s1", "s2", "s3"]),
    ],
)
def test_the_share_sets_how_long_guests_wait(share: float, expected: list[str]) -> None:
    log: list[str] = []
    clock = Clock()
    host = Host("background", TurnRules(background_share=share), clock=clock)
    for name in "abc":
        host.offer(_guest(log, name, "interactive", clock, took=1.0))
    _slices(host, log, clock, 4)
    assert log == expected


def test_a_guest_waits_for_the_hosts_time_not_for_the_end_of_its_chunk() -> None:
    """A guest that arrives while the host is owed time runs at the first pause after the host
    caught up, in the middle of a chunk (before: at the chunk's end)."""
    log: list[str] = []
    clock = Clock()
    host = Host("background", TurnRules(background_share=0.75), clock=clock)
    host.offer(_guest(log, "a", "interactive", clock, took=2.0))
    host.boundary()  # owed 3 x 2 s
    host.offer(_guest(log, "b", "interactive", clock, took=2.0))
    for piece in range(20):  # a chunk of twenty 0.5 s pieces
        log.append(f"p{piece}")
        clock.now += 0.5
        host.pause()
    host.boundary()
    # Twelve pieces make the 6 s owed: b runs in the middle of the chunk.
    assert log[:2] == ["a", "p0"]
    assert log[log.index("b") - 1] == "p11"


def test_the_host_is_owed_no_more_than_its_longest_chunk() -> None:
    """A long guest (a large batch) makes the next one wait at most a chunk of the host's, as
    long as a turn of a whole chunk did (before any chunk ended, nothing bounds it)."""
    log: list[str] = []
    clock = Clock()
    host = Host("background", TurnRules(background_share=0.8), clock=clock)
    _slices(host, log, clock, 2)  # a chunk of 2 s, then its boundary
    host.boundary()
    log.clear()
    host.offer(_guest(log, "batch", "interactive", clock, took=10.0))  # would be owed 40 s
    host.offer(_guest(log, "next", "interactive", clock, took=1.0))
    _slices(host, log, clock, 4)
    assert log == ["s0", "batch", "s1", "s2", "next", "s3"]


def test_time_that_the_host_ran_alone_is_no_credit() -> None:
    """However long the host ran while nobody waited, the next guest runs at its next pause."""
    log: list[str] = []
    clock = Clock()
    host = Host("background", TurnRules(background_share=0.9), clock=clock)
    _slices(host, log, clock, 3, took=100.0)
    host.boundary()
    host.offer(_guest(log, "a", "interactive", clock, took=1.0))
    host.offer(_guest(log, "b", "interactive", clock, took=1.0))
    _slices(host, log, clock, 10)
    # a ran at its first pause; b waited for the nine seconds owed for a.
    assert log == ["s0", "s1", "s2", "s0", "a", *(f"s{n}" for n in range(1, 10)), "b"]


@pytest.mark.parametrize(
    ("host_caller", "callers", "expected"),
    [
        # The job's own client's requests: the share (0.8: four seconds a second).
        ("address:a", ("address:a",), ["s0", "a", "s1", "s2", "s3", "s4", "b", "s5"]),
        # Another client's, or a batch with one: an equal share at most (a second a second).
        ("address:a", ("address:b",), ["s0", "a", "s1", "b", "s2", "s3", "s4", "s5"]),
        ("address:a", ("address:a", "address:b"), ["s0", "a", "s1", "b", "s2", "s3", "s4", "s5"]),
        # A job of an unknown client: every request counts as its own.
        ("", ("address:b",), ["s0", "a", "s1", "s2", "s3", "s4", "b", "s5"]),
    ],
)
def test_against_other_clients_a_job_keeps_an_equal_share_at_most(
    host_caller: str, callers: tuple[str, ...], expected: list[str]
) -> None:
    log: list[str] = []
    clock = Clock()
    host = Host("background", TurnRules(background_share=0.8), caller=host_caller, clock=clock)
    for name in "ab":
        host.offer(_guest(log, name, "interactive", clock, took=1.0, callers=callers))
    _slices(host, log, clock, 6)
    assert log == expected


def test_background_guests_of_a_background_host_spend_what_it_is_owed() -> None:
    """Interactive work first; then the background guests that asked before the host's turn go
    before the host, and their time counts as the background's."""
    log: list[str] = []
    clock = Clock()
    host = Host("background", TurnRules(background_share=0.5), clock=clock)
    host.offer(_guest(log, "job", "background", clock, took=1.0))
    host.offer(_guest(log, "click", "interactive", clock, took=1.0))
    host.offer(_guest(log, "click2", "interactive", clock, took=1.0))
    _slices(host, log, clock, 2)
    assert log == ["s0", "click", "job", "click2", "s1"]


def test_interactive_guests_run_at_the_next_boundary_of_a_background_host() -> None:
    log: list[str] = []
    host = Host("background", TurnRules(), clock=Clock())
    for name in ("a", "b"):
        assert host.offer(_guest(log, name, "interactive"))
    _chunks(host, log, 2)
    # Guests that take no time leave the host owed nothing: both run at the first boundary.
    assert log == ["chunk0", "a", "b", "chunk1"]
    assert host.yields == 1


# An interactive host: turns, and the starvation guard of background guests.


def test_within_a_class_turns_go_in_the_order_they_were_asked_for() -> None:
    log: list[str] = []
    host = Host("interactive", TurnRules(background_every=4))
    host.offer(_guest(log, "early", "interactive"))
    log.append("chunk0")
    # A guest offered while the boundary is being served asks after the host: it waits a chunk.
    late = _guest(log, "late", "interactive")
    host._guests[0].run = lambda: (log.append("early"), host.offer(late))  # type: ignore[assignment]
    host.boundary()
    log.append("chunk1")
    host.boundary()
    assert log == ["chunk0", "early", "chunk1", "late"]


def test_interactive_work_goes_before_background_work_at_a_boundary() -> None:
    log: list[str] = []
    host = Host("interactive", TurnRules(background_every=10))
    host.offer(_guest(log, "job", "background"))
    host.offer(_guest(log, "click", "interactive"))
    _chunks(host, log, 1)
    # The interactive guest asked before the host's next chunk; the background one waits.
    assert log == ["chunk0", "click"]
    assert host.waiting == 1


def test_background_guests_of_an_interactive_host_are_not_starved() -> None:
    log: list[str] = []
    host = Host("interactive", TurnRules(background_every=3))
    log.append("chunk0")  # the host's first turn, before the job asked
    host.offer(_guest(log, "job", "background"))
    for number in (1, 2, 3):
        host.boundary()
        log.append(f"chunk{number}")
    # Of the turns since the job asked (chunk1, chunk2, job), one in N = 3 is the job's.
    assert log == ["chunk0", "chunk1", "chunk2", "job", "chunk3"]


def test_an_interactive_host_goes_on_at_its_pauses_while_background_guests_wait() -> None:
    log: list[str] = []
    host = Host("interactive", TurnRules(background_every=2))
    host.offer(_guest(log, "job", "background"))
    log.append("chunk0")
    for _ in range(3):
        host.pause()  # going on at a pause is not a turn: the job waits for a boundary
    host.boundary()
    log.append("chunk1")
    host.boundary()
    assert log == ["chunk0", "chunk1", "job"]


def _chunk_with_pauses(host: Host, log: list[str], number: int, pauses: int) -> None:
    """One chunk of the host: ``pauses`` pauses inside its forwards, then its boundary."""
    log.append(f"chunk{number}")
    for _ in range(pauses):
        host.pause()
    host.boundary()


def test_interactive_guests_run_at_a_pause_inside_the_chunk_of_a_background_host() -> None:
    log: list[str] = []
    host = Host("background", TurnRules(background_every=4))
    log.append("chunk0")
    host.pause()  # nobody waits: the chunk goes on
    host.offer(_guest(log, "a", "interactive"))
    host.pause()
    log.append("rest of chunk0")
    host.boundary()
    assert log == ["chunk0", "a", "rest of chunk0"]
    assert host.yields == 1


def test_a_host_without_pauses_serves_its_guests_at_boundaries_only() -> None:
    log: list[str] = []
    host = Host("background", TurnRules(background_every=4, pauses=False))
    host.offer(_guest(log, "a", "interactive"))
    _chunk_with_pauses(host, log, 0, pauses=3)
    assert log == ["chunk0", "a"]


def test_a_closed_host_declines_what_still_waits_and_refuses_more() -> None:
    log: list[str] = []
    host = Host("background", TurnRules(background_every=4))
    host.offer(_guest(log, "a", "interactive"))
    assert len(host.close()) == 1
    assert log == ["declined a"]
    assert not host.offer(_guest(log, "b", "interactive"))


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        ({"background_every": 1}, "background_every"),
        ({"background_share": 1.0}, "background_share"),
        ({"background_share": -0.1}, "background_share"),
    ],
)
def test_the_rules_are_checked(rules: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TurnRules(**rules)  # type: ignore[arg-type]


def test_the_settings_give_every_batcher_its_rules(tmp_path: Path) -> None:
    settings = Settings(
        model_store=tmp_path, background_every=5, background_share=0.5, pause_in_forwards=False
    )
    with ThreadPoolExecutor(1) as threads:
        explainer = Explainer.from_settings(settings, None, model_threads=threads)  # type: ignore[arg-type]
    assert explainer.turns == TurnRules(background_every=5, background_share=0.5, pauses=False)
    assert Settings(model_store=tmp_path).background_share == TurnRules().background_share


# ---------------------------------------------------------------------------- interleavings

#: Small chunks, so that a pass has many boundaries; seeds where a method draws noise.
OPTIONS: dict[str, dict[str, object]] = {
    "ScoreCAM": {"batch_size": 3},
    "SSCAM": {"batch_size": 5, "num_samples": 3, "seed": 1},
    "ISCAM": {"batch_size": 5, "num_samples": 3},
    "AblationCAM": {"batch_size": 3},
    "SmoothGradCAMpp": {"num_samples": 4, "seed": 1},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    """tiny (every method but LeGrad) and vit (LeGrad), loaded as the service loads them."""
    root = tmp_path_factory.mktemp("interleaving")
    torch.manual_seed(0)
    write_model(
        root,
        "tiny",
        build_tiny(width=6),
        architecture="tests.fixtures_models:build_tiny",
        kwargs="kwargs = { width = 6 }",
        num_classes=3,
        input_size=16,
        target_layers=["features"],
    )
    vit = build_tiny_vit()
    torch.nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head
    write_model(
        root,
        "vit",
        vit,
        architecture="tests.fixtures_models:build_tiny_vit",
        num_classes=3,
        input_size=32,
        target_layers=["encoder.layers.encoder_layer_1.ln_1"],
    )
    registry = ModelRegistry(root, torch.device("cpu"), "tiny", access=fixture_access(root))
    registry.discover()
    registry.load_all()
    return {name: registry.get(name) for name in ("tiny", "vit")}


#: Layers of their own where the model's default (one layer) does not do.
LAYERS = {"RefineCAM": ("features.0", "features.2")}


def _plan(model: LoadedModel, method: str, layers: tuple[str, ...] = ()) -> CamPlan:
    """The method's plan as the explainer makes it (raw maps: any mixing shows)."""
    layers = layers or LAYERS.get(method, ())
    explainer = Explainer(None, SlotLimiter(1, 0), 10**8)  # type: ignore[arg-type]
    params = ExplainParams(
        method=method, options=dict(OPTIONS.get(method, {})), target_layers=layers
    )
    plans, _ = explainer._check(model, params, 2)
    return CamPlan(**{**plans[0].__dict__, "normalized": False})


def _model_for(models: dict[str, LoadedModel], method: str) -> LoadedModel:
    return models["vit" if method == "LeGrad" else "tiny"]


def _item(model: LoadedModel, seed: int, class_idx: tuple[int, ...] = ()) -> CamItem:
    shape = model.spec.input_shape
    batch = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed))
    return CamItem(batch, class_idx)


class _Hosting:
    """A pass's control that makes it the model's host (``Host.boundary`` at each boundary,
    ``Host.pause`` at each pause inside its chunks' forwards)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.boundaries = 0
        self.pauses = 0

    def should_stop(self) -> bool:
        return False

    def at_boundary(self) -> bool:
        self.boundaries += 1
        self.host.boundary()
        return False

    def at_pause(self) -> None:
        self.pauses += 1
        self.host.pause()

    def progress(self, done: int, total: int) -> None:
        pass


def _every_turn(host: Host, run: Callable[[], object], seen: list[object]) -> None:
    """Offer ``run`` to ``host`` so that it runs at every one of its boundaries and pauses."""

    def again() -> None:
        seen.append(run())
        host.offer(Guest("interactive", again, lambda: None))

    host.offer(Guest("interactive", again, lambda: None))


def _assert_same(got: CamOutcome, alone: CamOutcome) -> None:
    torch.testing.assert_close(got.logits, alone.logits, rtol=1e-5, atol=1e-5)
    assert got.class_idx == alone.class_idx
    for a, b in zip(got.cams, alone.cams, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if alone.fused is None:
        assert got.fused is None
    else:
        assert got.fused is not None
        torch.testing.assert_close(got.fused, alone.fused, rtol=1e-5, atol=1e-5)


def _hosted(
    model: LoadedModel, host_plan: CamPlan, host_item: CamItem, guest: Callable[[], object]
) -> tuple[CamOutcome, list[object], _Hosting]:
    """The host's answer with ``guest`` run at each of its boundaries and pauses (an interactive
    host: a guest asked before the host's turn goes first, once per boundary or pause); the
    guests' answers; the control (its counts)."""
    host = Host("interactive", TurnRules(background_every=2))
    seen: list[object] = []
    _every_turn(host, guest, seen)
    control = _Hosting(host)
    (outcome,) = run_cam_pass(model, host_plan, [host_item], control)
    host.close()
    return outcome, seen, control


def _host_plan(model: LoadedModel) -> CamPlan:
    """A chunked pass on two layers where the model has them (a per-layer loop is the place
    where a host re-reads what its hooks recorded)."""
    if model.spec.name == "vit":
        # The patch embedding: the ViT's one layer with a grid (its blocks give tokens, which
        # the service does not lay on a grid: refused since 3a78600)
        return _plan(model, "SmoothGradCAMpp", ("conv_proj",))
    return _plan(model, "AblationCAM", ("features.0", "features.2"))


#: RandomCAM draws noise at every call (unseeded here): two runs never agree, hosted or not.
#: The methods of a classifier (D-RISE explains a detector's boxes; tests/pipeline/tasks has its).
CLASSIFIER_METHODS = [name for name, cls in METHODS.items() if not cls.explains_detections]


@pytest.mark.parametrize("method", [name for name in CLASSIFIER_METHODS if name != "RandomCAM"])
def test_a_pass_between_the_chunks_of_another_answers_as_if_alone(
    models: dict[str, LoadedModel], method: str
) -> None:
    model = _model_for(models, method)
    plan, item = _plan(model, method), _item(model, seed=1, class_idx=(2,))
    host_plan, host_item = _host_plan(model), _item(model, seed=2)
    (guest_alone,) = run_cam_pass(model, plan, [item])
    (host_alone,) = run_cam_pass(model, host_plan, [host_item])

    host_outcome, seen, control = _hosted(
        model, host_plan, host_item, lambda: run_cam_pass(model, plan, [item])[0]
    )

    # The guest ran at every boundary and every pause.
    assert control.boundaries >= 3 and control.pauses >= 3
    assert len(seen) == control.boundaries + control.pauses
    _assert_same(host_outcome, host_alone)
    for outcome in seen:
        assert isinstance(outcome, CamOutcome)
        _assert_same(outcome, guest_alone)


CHUNKED = [
    name
    for name in CLASSIFIER_METHODS
    if METHODS[name].masked_forwards or METHODS[name].noisy_forwards
]


@pytest.mark.parametrize("method", CHUNKED)
def test_a_chunked_pass_hosting_others_answers_as_if_alone(
    models: dict[str, LoadedModel], method: str
) -> None:
    model = models["tiny"]
    plan, item = _plan(model, method), _item(model, seed=3)
    guest_plan, guest_item = _plan(model, "GradCAM"), _item(model, seed=4, class_idx=(1,))
    (alone,) = run_cam_pass(model, plan, [item])
    (guest_alone,) = run_cam_pass(model, guest_plan, [guest_item])
    (logits_alone,) = run_forward_pass(model, [guest_item.batch])

    def guests() -> tuple[CamOutcome, torch.Tensor]:
        (cam,) = run_cam_pass(model, guest_plan, [guest_item])
        (forward,) = run_forward_pass(model, [guest_item.batch])
        return cam, forward.logits

    outcome, seen, control = _hosted(model, plan, item, guests)

    assert control.boundaries >= 3 and control.pauses >= 3
    assert len(seen) == control.boundaries + control.pauses
    _assert_same(outcome, alone)
    for cam, logits in seen:  # type: ignore[misc]
        _assert_same(cam, guest_alone)
        torch.testing.assert_close(logits, logits_alone.logits, rtol=1e-5, atol=1e-5)


@pytest.fixture
def no_hook_scopes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every pass in the default scope, as before passes had scopes of their own."""
    from contextlib import nullcontext

    import app.pipeline.passes as passes

    monkeypatch.setattr(passes, "hook_scope", lambda _scope: nullcontext())
    yield


def test_without_pass_scopes_a_guest_corrupts_its_host(
    models: dict[str, LoadedModel], no_hook_scopes: None
) -> None:
    """The checks above can fail: without scopes, the host's hooks record the guest's forwards
    at its boundaries, and a guest in a pause records nothing (the host silenced every hook)."""
    model = models["tiny"]
    host_plan, host_item = _host_plan(model), _item(model, seed=2)
    guest_plan, guest_item = _plan(model, "GradCAM"), _item(model, seed=5)
    (host_alone,) = run_cam_pass(model, host_plan, [host_item])

    def guest() -> CamOutcome | RuntimeError:
        try:
            return run_cam_pass(model, guest_plan, [guest_item])[0]
        except RuntimeError as error:
            return error

    outcome, seen, _ = _hosted(model, host_plan, host_item, guest)
    with pytest.raises(AssertionError):
        _assert_same(outcome, host_alone)
    broken = [o for o in seen if isinstance(o, RuntimeError)]
    assert broken and "No activation recorded" in str(broken[0])
