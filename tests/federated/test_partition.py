"""Client partitions of the bundled plays and of a user's folder; federate's one-line errors."""

import subprocess
import sys

import pytest

from lmscale.errors import LmscaleError
from lmscale.federated.partition import SHAKESPEARE_GENRES, client_partitions

GENRES = ["comedies", "histories", "problems", "roman", "romances", "tragedies"]


def test_shakespeare_genres_is_one_client_per_genre_each_holding_out_a_play():
    parts = client_partitions(SHAKESPEARE_GENRES)
    assert [p.name for p in parts] == GENRES
    for part in parts:
        assert len(part.heldout) == 1 and len(part.train) >= 3
        held = part.heldout[0].name
        assert held not in {d.name for d in part.train}  # split by play
        assert part.heldout[0].text not in part.train_text
    assert [p.name for p in client_partitions(SHAKESPEARE_GENRES, 3)] == GENRES[:3]
    with pytest.raises(LmscaleError, match="has only 6 clients"):
        client_partitions(SHAKESPEARE_GENRES, 7)


def test_a_folder_gives_one_client_per_entry(tmp_path):
    (tmp_path / "bank").mkdir()
    for i in range(10):
        (tmp_path / "bank" / f"memo{i}.txt").write_text(f"memo {i}\n" * 20)
    lines = "".join(f'{{"text": "note {i}"}}\n' for i in range(3))
    (tmp_path / "clinic.jsonl").write_text(lines)
    (tmp_path / "office.txt").write_text("".join(f"line {i}\n" for i in range(50)))
    parts = {p.name: p for p in client_partitions(tmp_path)}
    assert list(parts) == ["bank", "clinic", "office"]
    assert len(parts["bank"].train) == 9 and parts["bank"].heldout[0].name == "memo9.txt"
    assert len(parts["clinic"].train) == 2 and len(parts["clinic"].heldout) == 1
    office = parts["office"]  # one document: its last tenth of lines is held out
    assert office.heldout_text == "".join(f"line {i}\n" for i in range(45, 50))
    assert office.train_text + office.heldout_text == (tmp_path / "office.txt").read_text()


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(LmscaleError, match="unknown federated data"):
        client_partitions(tmp_path / "missing")
    with pytest.raises(LmscaleError, match="holds no client data"):
        client_partitions(tmp_path)
    (tmp_path / "one.txt").write_text("just one line")
    with pytest.raises(LmscaleError, match="single line"):
        client_partitions(tmp_path)


@pytest.mark.parametrize("args,message", [
    (["--clients", "9"], "has only 6 clients"),
    (["--strategy", "fedsgd"], "--strategy must be fedavg or fedprox"),
    (["--dp-noise", "1.0"], "client-level DP needs --dp-clip"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-epsilon", "8"], "not both"),
    (["--dp-sgd"], "--dp-sgd needs --dp-noise"),
    (["--local-steps", "0"], "--local-steps must be a positive integer"),
    (["--model", "no-such-model"], "model not found"),
])  # fmt: skip
def test_bad_federate_arguments_are_one_line_errors(args, message, tmp_path):
    pytest.importorskip("flwr")
    out = tmp_path / "fed"
    result = subprocess.run(
        [sys.executable, "-m", "lmscale", "federate", "--out", str(out), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (out / "rounds.jsonl").exists()
