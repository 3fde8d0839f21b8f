"""One model across several processes on localhost (MLX's ring backend, CPU), against the same
model in one process: the split of the experts, float32 logits and greedy tokens with 2 and 3
ranks (8 experts: 3 + 3 + 2 over 3 ranks) in the published and converted layouts, the `generate`,
`chat` and `serve` commands under `mlx.launch` (`serve` through the real `openai` client, against
a server in one process), what each rank holds in memory at the real 120b layer shapes, and how a
run ends when a rank dies, hangs or never comes."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import checkpoints as ck
import httpx
import mlx.core as mx
import numpy as np
import pytest
from distributed_rank import GREEDY_TOKENS, PROMPT
from serving import running

from gptoss_mlx import convert, distributed, generate, load, load_model
from gptoss_mlx.loading import build_model
from gptoss_mlx.moe import MoE
from gptoss_mlx.safetensors_check import read_header
from gptoss_mlx.server import create_app
from gptoss_mlx.synthetic import hf_config_json
from gptoss_mlx.weights import checkpoint_from_tensors, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK_SCRIPT = os.path.join(ROOT, "tests", "distributed_rank.py")
LAUNCHER = os.path.join(os.path.dirname(sys.executable), "mlx.launch")


# --- running ranks --------------------------------------------------------------------------------


def free_ports(n: int) -> int:
    """The first of `n` consecutive TCP ports free on localhost now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


def environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_RANK", "MLX_HOSTFILE"))}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
    env.update(extra)
    return env


def launch(n: int, args: list[str], tmp_path, stdin: str = "", timeout: float = 240) -> tuple:
    """`mlx.launch --backend ring -n N python ARGS` as a user runs it: (returncode, stdout,
    stderr). stdin stays open after `stdin` is written (mlx.launch forwards it to every rank and
    never closes theirs)."""
    out, err = tmp_path / f"launch{n}.out", tmp_path / f"launch{n}.err"
    command = [LAUNCHER, "--backend", "ring", "-n", str(n), "--starting-port"]
    command += [str(free_ports(n)), "--", sys.executable, *args]
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=environment(), stdin=subprocess.PIPE, stdout=o, stderr=e
        )
        proc.stdin.write(stdin.encode())
        proc.stdin.flush()
        try:
            proc.wait(timeout=timeout)
        finally:
            proc.kill()
            proc.stdin.close()
    return proc.returncode, out.read_text(), err.read_text()


def spawn(
    n: int, args: list[str], tmp_path, stdin=subprocess.DEVNULL, only=None, **env: str
) -> list:
    """The N ranks (or `only` those) started by hand, as a launcher would (MLX_RANK,
    MLX_HOSTFILE), each with its own stdout and stderr files: Popen objects with `.out` and
    `.err` paths."""
    base = free_ports(n)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(n)]))
    procs = []
    for r in range(n) if only is None else only:
        out, err = tmp_path / f"rank{r}.out", tmp_path / f"rank{r}.err"
        with open(out, "w") as o, open(err, "w") as e:
            rank_env = environment(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile), **env)
            p = subprocess.Popen(
                [sys.executable, *args], cwd=ROOT, env=rank_env, stdin=stdin, stdout=o, stderr=e
            )
        p.out, p.err = out, err
        procs.append(p)
    return procs


def cli(*args: str) -> list[str]:
    return ["-m", "gptoss_mlx.cli", *args]


def wait_all(procs: list, timeout: float) -> float:
    """Seconds until every process ended (killing them all if `timeout` passes first)."""
    start = time.monotonic()
    try:
        for p in procs:
            p.wait(timeout=max(0.1, timeout - (time.monotonic() - start)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return time.monotonic() - start


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# --- the split ------------------------------------------------------------------------------------


class FakeGroup:
    """Rank r of n, for the arithmetic of the split (no communication)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize(
    "experts,ranks,expected",
    [(8, 3, [(0, 3), (3, 6), (6, 8)]), (8, 2, [(0, 4), (4, 8)]), (128, 3, None), (32, 5, None)],
)
def test_every_expert_on_exactly_one_rank_in_even_contiguous_ranges(experts, ranks, expected):
    shards = [distributed.ExpertShard(FakeGroup(r, ranks), experts) for r in range(ranks)]
    got = [(s.start, s.stop) for s in shards]
    if expected is not None:
        assert got == expected
    assert got[0][0] == 0 and got[-1][1] == experts
    assert all(a[1] == b[0] for a, b in zip(got, got[1:], strict=False))
    assert max(s.count for s in shards) - min(s.count for s in shards) <= 1


def test_more_ranks_than_experts_is_refused():
    with pytest.raises(distributed.GptOssError, match="at most 8 ranks"):
        distributed.expert_shard(8, FakeGroup(0, 9))
    assert distributed.expert_shard(8, FakeGroup(0, 1)) is None


def test_the_ranks_partial_moe_outputs_sum_to_the_whole_layer(hf_tensors):
    """Each rank's experts on its localized routing, summed over the ranks (what all_sum does),
    equal the layer with all experts; no rank alone does."""
    config = ck.TINY
    model = build_model(checkpoint_from_tensors(hf_tensors, hf_config_json(config)), mx.float32)
    whole = model.layers[1].mlp
    x = mx.random.normal((2, 7, config.hidden_size), key=mx.random.key(5))
    flat = x.reshape(-1, config.hidden_size)
    indices, weights = whole.route(flat)
    expected = np.array(whole(x)).reshape(-1, config.hidden_size)
    for size in (2, 3):
        parts = []
        for r in range(size):
            shard = distributed.ExpertShard(FakeGroup(r, size), config.num_experts)
            layer = MoE(config, shard)
            for name in ("gate_up_proj", "down_proj"):
                mine, full = getattr(layer.experts, name), getattr(whole.experts, name)
                for p in ("weight", "scales", "bias"):
                    setattr(mine, p, getattr(full, p)[shard.start : shard.stop])
            parts.append(np.array(layer.experts(flat, *shard.localize(indices, weights))))
        np.testing.assert_allclose(sum(parts), expected, rtol=1e-5, atol=1e-6)
        assert all(np.abs(p - expected).max() > 1e-3 for p in parts)


@pytest.mark.parametrize(
    "writer",
    [
        ck.write_hf_mxfp4,
        ck.write_hf_bf16,
        ck.write_original,
        lambda folder, cfg, t: ck.write_mlx_community(folder, cfg, t, dense_bits=8),
        "converted",
    ],
    ids=["hf-mxfp4", "hf-bf16", "original", "mlx-community", "gptoss-mlx"],
)
def test_every_layout_gives_a_rank_exactly_its_rows_of_every_tensor(
    writer, hf_tensors, converted_dir, tmp_path
):
    """A rank's checkpoint, read from the files (only its byte ranges of the expert tensors),
    holds rows start..stop of the whole checkpoint's expert tensors and all the rest unchanged."""
    folder = converted_dir if writer == "converted" else writer(tmp_path, ck.TINY, hf_tensors)
    whole = read_checkpoint(folder).tensors
    for r in range(3):
        part = read_checkpoint(folder, FakeGroup(r, 3))
        assert (
            part.shard is not None
            and (part.shard.start, part.shard.stop) == [(0, 3), (3, 6), (6, 8)][r]
        )
        assert part.tensors.keys() == whole.keys()
        for name, full in whole.items():
            expected = full[part.shard.start : part.shard.stop] if ".experts." in name else full
            assert part.tensors[name].dtype == expected.dtype, name
            np.testing.assert_array_equal(
                np.array(part.tensors[name].astype(mx.float32)),
                np.array(expected.astype(mx.float32)),
                err_msg=name,
            )


# --- parity with one process ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_logits_and_greedy_tokens_equal_one_process(n, hf_mxfp4_dir, converted_dir, tmp_path):
    folders = [hf_mxfp4_dir, converted_dir]
    rc, out, err = launch(n, [RANK_SCRIPT, "parity", str(tmp_path), *folders], tmp_path)
    assert rc == 0 and "Traceback" not in err and not errors(err), err
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(n)]
    for i, folder in enumerate(folders):
        single = load_model(folder, "float32")
        logits = np.array(single(mx.array([PROMPT])))
        tokens = generate(single, PROMPT, max_tokens=GREEDY_TOKENS, temperature=0.0)
        for r in range(n):
            got = ranks[r][f"logits{i}"]
            assert ck.relative_error(got, logits) <= 1e-5, (r, folder)
            assert ranks[r][f"tokens{i}"].tolist() == tokens["completion_token_ids"]
            np.testing.assert_array_equal(got, ranks[0][f"logits{i}"])  # the ranks agree
            # sampled with seeds of their own, the ranks still feed back rank 0's tokens
            assert ranks[r][f"sampled{i}"].tolist() == ranks[0][f"sampled{i}"].tolist()


def test_ranks_given_different_prompts_stop_with_an_error(hf_mxfp4_dir, tmp_path):
    procs = spawn(2, [RANK_SCRIPT, "mismatch", str(tmp_path), hf_mxfp4_dir], tmp_path)
    wait_all(procs, 60)
    for p in procs:
        assert p.returncode == 0, p.err.read_text()
        assert p.out.read_text().startswith(
            "GptOssError: rank 1 is about to run other tokens than rank 0"
        )


# --- the commands under mlx.launch ----------------------------------------------------------------


FLOAT32_GREEDY = ["--dtype", "float32", "--temperature", "0"]


@pytest.mark.parametrize(
    "n,response_format",
    [(2, None), (3, None), (2, {"type": "regex", "pattern": "[a-z ]{1,40}"})],
    ids=["2", "3", "2-regex"],
)
def test_generate_across_ranks_prints_one_process_tokens_once(
    n, response_format, o200k_dir, tmp_path
):
    question = "Why is the sky blue?"
    args = ["generate", question, "-m", o200k_dir, *FLOAT32_GREEDY, "--max-tokens", "24", "--json"]
    if response_format is not None:
        args += ["--regex", response_format["pattern"]]
    rc, out, err = launch(n, cli(*args), tmp_path)
    assert rc == 0 and not errors(err) and "Traceback" not in err, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # rank 0 alone writes
    model, tok = load(o200k_dir, "float32")
    single = generate(
        model,
        question,
        tokenizer=tok,
        max_tokens=24,
        temperature=0.0,
        response_format=response_format,
    )
    assert json.loads(lines[0])["completion_token_ids"] == single["completion_token_ids"]
    assert err.count("generation: ") == 1  # statistics once, from rank 0


def test_generate_across_ranks_wants_the_prompt_as_an_argument(tmp_path):
    procs = spawn(2, cli("generate", "-m", "unused"), tmp_path)
    wait_all(procs, 60)
    for p in procs:
        assert p.returncode == 2
        assert "give the PROMPT as an argument" in p.err.read_text()


@pytest.mark.parametrize("n", [2, 3])
def test_chat_across_ranks_answers_as_one_process_and_keeps_the_cache(n, o200k_dir, tmp_path):
    args = cli("chat", "-m", o200k_dir, *FLOAT32_GREEDY, "--max-tokens", "12")
    lines = "Hello there\nAnd a second question?\n/stats\n/quit\n"
    single = subprocess.run(
        [sys.executable, *args],
        input=lines,
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr
    rc, out, err = launch(n, args, tmp_path, stdin=lines)
    assert rc == 0 and not errors(err) and "Traceback" not in err, err
    assert out == single.stdout  # both replies, printed once
    stats = re.search(r"turns: 2 .*\nprefilled: .* full prefills: 1", err)
    assert stats is not None, err  # the second turn prefilled only its own tokens
    assert stats.group(0) in single.stderr
    assert err.count("turns: 2") == 1


def test_bench_across_ranks_reports_each_ranks_share_and_the_collectives(tmp_path):
    args = ["bench", "--synthetic", "tiny", "--dtype", "float32", "--prompt-tokens", "8"]
    args += ["--gen-tokens", "3", "--repeats", "1", "--no-warmup", "--json"]
    rc, out, err = launch(2, cli(*args), tmp_path)
    assert rc == 0 and not errors(err) and "Traceback" not in err, err
    ranks = json.loads(out)["ranks"]  # rank 0 alone prints
    assert ranks["size"] == 2 and ranks["experts_per_rank"] == [4, 4]
    layers = 4  # benchmark.TINY: one all_sum per layer, and one for rank 0's token
    assert ranks["collectives_per_token"] == layers + 1
    assert ranks["weight_bytes_per_rank"][0] == ranks["weight_bytes_per_rank"][1]


# --- memory ---------------------------------------------------------------------------------------


def stored_bytes(folder: str) -> tuple[int, int]:
    """(expert bytes, other bytes) of a checkpoint's tensors, from the safetensors headers."""
    experts = dense = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            for key, info in read_header(os.path.join(folder, name)).items():
                if ".experts." in key:
                    experts += info.nbytes
                else:
                    dense += info.nbytes
    return experts, dense


@pytest.mark.parametrize("n,layout", [(2, "hf-mxfp4"), (3, "gptoss-mlx")])
def test_each_rank_holds_its_share_of_the_experts(n, layout, real_120b_layer_dir, tmp_path):
    folder = real_120b_layer_dir
    if layout == "gptoss-mlx":
        folder = convert(real_120b_layer_dir, str(tmp_path / "converted"))
    experts, dense = stored_bytes(folder)
    procs = spawn(n, [RANK_SCRIPT, "memory", str(tmp_path), folder], tmp_path)
    wait_all(procs, 300)
    assert all(p.returncode == 0 for p in procs), [p.err.read_text() for p in procs]
    counts = [128 // n + (r < 128 % n) for r in range(n)]
    for r in range(n):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        share = dense + experts * counts[r] // 128
        print(r, {k: v / 1e9 if k.endswith("bytes") else v for k, v in got.items()}, share / 1e9)
        assert got["experts"] == counts[r]
        assert got["expert_parameter_bytes"] == experts * counts[r] // 128
        # measured: what MLX holds and what the process grew by, against the share
        assert abs(got["active_bytes"] - share) <= 0.01 * share
        assert got["peak_bytes"] <= 1.05 * share
        assert got["rss_growth_bytes"] <= 1.1 * share + 100e6


# --- failures -------------------------------------------------------------------------------------


LONG_GENERATION = ["--max-tokens", "100000", "--raw"]


def started(proc, timeout: float = 60) -> None:
    """Wait until rank 0 has printed generated text."""
    deadline = time.monotonic() + timeout
    while proc.out.stat().st_size == 0:
        assert proc.poll() is None, proc.err.read_text()
        assert time.monotonic() < deadline, "generation did not start"
        time.sleep(0.2)


def test_a_killed_rank_ends_every_rank_with_one_error_line(o200k_dir, tmp_path):
    procs = spawn(
        3, cli("generate", "Hello", "-m", o200k_dir, *FLOAT32_GREEDY, *LONG_GENERATION), tmp_path
    )
    started(procs[0])
    procs[1].send_signal(signal.SIGKILL)
    took = wait_all(procs, 30)
    assert took < 15
    for r in (0, 2):
        err = procs[r].err.read_text()
        assert procs[r].returncode == 1
        assert errors(err) == [
            f"error: rank {r}: another rank stopped, crashed or dropped off the network "
            "([ring] connection to a peer was lost)"
        ], err
        assert "[ring]" not in err.replace(errors(err)[0], "")  # the backend's log lines dropped


def rank_pids(launcher: int) -> dict[int, int]:
    """Rank -> pid of the processes `mlx.launch` (pid `launcher`) started, read from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found = {}
    for pid in parent:
        ancestor = parent.get(pid)
        while ancestor not in (None, 0, 1, launcher):
            ancestor = parent.get(ancestor)
        if ancestor != launcher:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                python = b"gptoss_mlx.cli" in f.read()
        except OSError:
            continue
        if python and b"MLX_RANK" in env:
            found[int(env[b"MLX_RANK"])] = pid
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks in /proc")
def test_under_mlx_launch_a_killed_rank_ends_the_run_one_line_per_rank(o200k_dir, tmp_path):
    """mlx.launch stops every rank (SIGTERM) when one fails; each says so in one line."""
    args = cli("generate", "Hello", "-m", o200k_dir, *FLOAT32_GREEDY, *LONG_GENERATION)
    command = [LAUNCHER, "--backend", "ring", "-n", "3", "--starting-port", str(free_ports(3))]
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as o, open(err, "w") as e:
        launcher = subprocess.Popen(
            [*command, "--", sys.executable, *args],
            cwd=ROOT,
            env=environment(),
            stdin=subprocess.PIPE,
            stdout=o,
            stderr=e,
        )
    try:
        deadline = time.monotonic() + 90
        while out.stat().st_size == 0 or len(rank_pids(launcher.pid)) < 3:
            assert launcher.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "generation did not start"
            time.sleep(0.2)
        os.kill(rank_pids(launcher.pid)[1], signal.SIGKILL)
        start = time.monotonic()
        launcher.wait(timeout=30)
        took = time.monotonic() - start
    finally:
        launcher.kill()
        launcher.stdin.close()
    assert took < 15
    lines = errors(err.read_text())
    assert sorted(line.split(":")[1] for line in lines) == [" rank 0", " rank 2"], lines
    assert all(
        "stopped by SIGTERM" in line or "another rank stopped, crashed" in line for line in lines
    )


def test_a_hung_rank_ends_the_others_after_the_timeout(o200k_dir, tmp_path):
    procs = spawn(
        2,
        cli("generate", "Hello", "-m", o200k_dir, *FLOAT32_GREEDY, *LONG_GENERATION),
        tmp_path,
        GPTOSS_MLX_DISTRIBUTED_TIMEOUT="3",
    )
    started(procs[0])
    procs[1].send_signal(signal.SIGSTOP)
    try:
        procs[0].wait(timeout=20)
    finally:
        procs[1].kill()
        wait_all(procs, 10)
    err = procs[0].err.read_text()
    assert procs[0].returncode == 1
    assert errors(err) == [
        "error: rank 0: no progress for 3 s: another rank hung or the network failed (the wait "
        "is set by GPTOSS_MLX_DISTRIBUTED_TIMEOUT)"
    ], err


def test_a_rank_left_alone_gives_up_connecting(o200k_dir, tmp_path):
    procs = spawn(  # rank 0 waits for rank 1, which never comes
        2, cli("chat", "-m", o200k_dir), tmp_path, only=[0], GPTOSS_MLX_DISTRIBUTED_TIMEOUT="2"
    )
    took = wait_all(procs, 30)
    err = procs[0].err.read_text()
    assert procs[0].returncode == 1 and took < 15
    assert errors(err) == [
        "error: rank 0: cannot connect to the other ranks (no answer in 2 s); check that every "
        "rank was started, the hostfile's addresses and the network "
        "(GPTOSS_MLX_DISTRIBUTED_TIMEOUT sets the wait)"
    ], err


def test_the_idle_chat_leader_notices_a_dead_rank(o200k_dir, tmp_path):
    """Rank 0 waits for a line (its stdin open, empty): its ticks find rank 1 gone."""
    read, write = os.pipe()
    try:
        procs = spawn(2, cli("chat", "-m", o200k_dir), tmp_path, stdin=read)
        deadline = time.monotonic() + 60
        while "Chatting with" not in procs[0].err.read_text():
            assert procs[0].poll() is None and time.monotonic() < deadline, procs[0].err.read_text()
            time.sleep(0.2)
        procs[1].kill()
        took = wait_all(procs, 20)
    finally:
        os.close(read)
        os.close(write)
    assert procs[0].returncode == 1 and took < 10
    assert len(errors(procs[0].err.read_text())) == 1


# --- serve across ranks ---------------------------------------------------------------------------


SERVED_MODEL = "gpt-oss-tiny"


def serve_args(o200k_dir: str, port: int) -> list[str]:
    return cli("serve", "-m", o200k_dir, "--dtype", "float32", "--port", str(port))


def wait_until_serving(url: str, procs: list, err, timeout: float = 120) -> None:
    """Wait until the server at `url` answers /health (its processes alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        assert all(p.poll() is None for p in procs), err.read_text()
        assert time.monotonic() < deadline, "the server did not start\n" + err.read_text()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)


@dataclasses.dataclass
class Launched:
    """`gptoss-mlx serve` under `mlx.launch`: its pid, the ring's first port, the HTTP port."""

    launcher: int
    ring: int
    port: int


@pytest.fixture(scope="module")
def served_launch(o200k_dir, tmp_path_factory):
    """`gptoss-mlx serve` of the tiny model (float32) under `mlx.launch`, 2 ranks on localhost."""
    tmp = tmp_path_factory.mktemp("served")
    base = free_ports(3)  # the ring's two ports, then the server's
    command = [LAUNCHER, "--backend", "ring", "-n", "2", "--starting-port", str(base), "--"]
    command += [sys.executable, *serve_args(o200k_dir, base + 2)]
    err = tmp / "err"
    with open(tmp / "out", "w") as o, open(err, "w") as e:
        launcher = subprocess.Popen(  # its own process group: the ranks are ended with it
            command,
            cwd=ROOT,
            env=environment(),
            stdin=subprocess.PIPE,
            stdout=o,
            stderr=e,
            start_new_session=True,
        )
    try:
        wait_until_serving(f"http://127.0.0.1:{base + 2}", [launcher], err)
        yield Launched(launcher.pid, base, base + 2)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        launcher.stdin.close()
    assert not errors(err.read_text()) and "Traceback" not in err.read_text(), err.read_text()


@pytest.fixture(scope="module")
def served_across_ranks(served_launch):
    """An `openai` client for the server across ranks."""
    openai = pytest.importorskip("openai")
    url = f"http://127.0.0.1:{served_launch.port}/v1"
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served_alone(o200k_dir):
    """The same server in one process: what the ranks must answer."""
    openai = pytest.importorskip("openai")
    model, tok = load(o200k_dir, "float32")
    with running(create_app(model, tok)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    del model
    gc.collect()  # the app's state and worker refer to each other: free the model now, not when
    # the collector next runs (a later test measuring peak memory would count it)


FIRST = [{"role": "user", "content": "Why is the sky blue?"}]
GREEDY = {"model": SERVED_MODEL, "temperature": 0, "max_tokens": 24}


def ask(client, messages):
    return client.chat.completions.create(messages=messages, **GREEDY)


def same_reply(across, alone) -> None:
    """Two chat completions with the same message (24 tokens of the random model's text, in the
    answer: it writes no channel headers), finish and usage."""
    assert across.choices[0].message == alone.choices[0].message
    assert across.choices[0].message.content != ""
    assert across.choices[0].finish_reason == alone.choices[0].finish_reason
    assert across.usage == alone.usage


def test_serve_across_ranks_answers_as_one_process(served_across_ranks, served_alone):
    """A request, the same streamed, and the conversation's next turn (from the prompt cache)."""
    first = ask(served_across_ranks, FIRST)
    same_reply(first, ask(served_alone, FIRST))
    chunks = list(
        served_across_ranks.chat.completions.create(messages=FIRST, stream=True, **GREEDY)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == first.choices[0].message.content != ""
    assert chunks[-1].choices[0].finish_reason == first.choices[0].finish_reason
    turns = [*FIRST, first.choices[0].message.model_dump(exclude_none=True)]
    turns.append({"role": "user", "content": "And at sunset?"})
    second = ask(served_across_ranks, turns)
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
    same_reply(second, ask(served_alone, turns))


def test_serve_across_ranks_a_client_that_leaves_mid_stream_frees_every_rank(
    served_across_ranks, served_alone
):
    """Were the cancellation not shared, the other rank would go on generating (100000 tokens)
    and the next request would wait for it, or find it out of step."""
    body = {"messages": [{"role": "user", "content": "Talk forever."}], "stream": True}
    body |= {"model": SERVED_MODEL, "max_tokens": 100000}
    url = str(served_across_ranks.base_url).removesuffix("/v1/").removesuffix("/v1")
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(8):
            next(lines)
    tic = time.monotonic()
    question = [{"role": "user", "content": "Hi"}]
    reply = ask(served_across_ranks, question)
    assert time.monotonic() - tic < 10
    same_reply(reply, ask(served_alone, question))


@pytest.mark.parametrize("when, killed", [("idle", 1), ("generating", 1), ("generating", 0)])
def test_serve_across_ranks_ends_when_a_rank_is_killed(when, killed, o200k_dir, tmp_path):
    """Rank 1 killed: rank 0 (the server, idle or streaming) ends; rank 0 killed: rank 1 (the
    follower, generating) ends. Either within a bounded time, with one line."""
    base = free_ports(3)
    procs = spawn(2, serve_args(o200k_dir, base + 2), tmp_path)
    url = f"http://127.0.0.1:{base + 2}"
    wait_until_serving(url, procs, procs[0].err)
    body = {"messages": [{"role": "user", "content": "Talk forever."}], "stream": True}
    with contextlib.ExitStack() as stack:
        if when == "generating":
            body |= {"model": SERVED_MODEL, "max_tokens": 100000}
            r = stack.enter_context(
                httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60)
            )
            lines = r.iter_lines()
            for _ in range(8):
                next(lines)
        procs[killed].send_signal(signal.SIGKILL)
        survivor = 1 - killed
        took = wait_all(procs[survivor : survivor + 1], 30)
    assert took < 15
    err = procs[survivor].err.read_text()
    assert procs[survivor].returncode == 1
    assert [re.sub(r"\(\[ring\] .*\)$", "([ring] ...)", line) for line in errors(err)] == [
        f"error: rank {survivor}: another rank stopped, crashed or dropped off the network "
        "([ring] ...)"
    ], err
    assert "Traceback" not in err


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (Linux: its sockets' inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serve_across_ranks_only_rank_0_opens_the_http_port(served_launch):
    ranks = rank_pids(served_launch.launcher)
    assert sorted(ranks) == [0, 1]
    assert served_launch.port in listening_ports(ranks[0])
    assert listening_ports(ranks[1]) <= {served_launch.ring + 1}  # the ring's, if it still listens


def test_serve_across_ranks_a_server_that_cannot_start_ends_every_rank(o200k_dir, tmp_path):
    """Rank 0 cannot listen (the port is taken): it says so in one line, and the other rank,
    told that the server stopped, ends cleanly rather than waiting for it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        procs = spawn(2, serve_args(o200k_dir, port), tmp_path)
        took = wait_all(procs, 120)
    assert took < 90
    assert [p.returncode for p in procs] == [1, 0], procs[1].err.read_text()
    assert errors(procs[0].err.read_text()) == [
        f"error: rank 0: cannot serve on http://127.0.0.1:{port}; the other ranks were stopped"
    ]
    assert errors(procs[1].err.read_text()) == [] and "Traceback" not in procs[1].err.read_text()
