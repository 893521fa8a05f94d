"""Data: user JSONL formats and errors, Shakespeare splits, fixed-length blocks."""

import json

import pytest
import torch

from p2pfed.config import DataSection
from p2pfed.data import DataError, assign, hold_out, load_peer_data, read_jsonl, shakespeare_dir, shakespeare_works, speaking_roles, to_blocks
from p2pfed.model import tiny_tokenizer

TOKENIZER = tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_row_formats_are_rendered(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "plain text"},
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
    ])
    rows = read_jsonl(path, TOKENIZER)
    assert rows[0] == "plain text"
    assert "Translate\n\nbonjour" in rows[1] and "<|im_start|>assistant\nhello<|im_end|>" in rows[1]
    assert "<|im_start|>assistant\nhello there" in rows[2]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "no rows"),
        (b'{"text": "a"}\n{"text": broken}\n', "line 2: not valid JSON"),
        (b'{"text": "a"}\n\xff\xfe\n', "not UTF-8"),
        (b'{"title": "a"}\n', "line 1: expected a 'text' string"),
        (b'[1, 2]\n', "line 1: expected a JSON object"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_jsonl(path, TOKENIZER)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_missing_jsonl(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "none.jsonl", TOKENIZER)


def test_jsonl_peers_and_global_eval(tmp_path):
    for rank in range(2):
        write_jsonl(tmp_path / f"peer{rank}.jsonl", [{"text": f"peer {rank} line {i} " * 8} for i in range(20)])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "shared evaluation text " * 10}] * 5)
    section = DataSection(source="jsonl", path=str(tmp_path / "peer{rank}.jsonl"), eval=str(tmp_path / "eval.jsonl"), block_size=32)
    zero = load_peer_data(section, TOKENIZER, 0, 2, seed=0)
    one = load_peer_data(section, TOKENIZER, 1, 2, seed=0)
    assert zero.train.shape[1] == 32 and not torch.equal(zero.train[:5], one.train[:5])
    assert torch.equal(zero.global_eval, one.global_eval)


def test_blocks_are_fixed_length_and_eos_separated():
    blocks = to_blocks(["abc", "defg"], TOKENIZER, 3)
    assert blocks.shape == (3, 3)  # 3 + 1 + 4 + 1 = 9 tokens
    assert blocks.view(-1)[3].item() == TOKENIZER.eos_token_id


def test_speaking_roles_are_parsed():
    play = ("play", "ACT I.\n\nSCENE I. A place.\n\nHAMLET.\nTo be, or not to be.\nThat is the question.\n\nOph.\nGood my lord.\n\nHAMLET.\nNymph.\n")
    roles = dict(speaking_roles(play))
    assert set(roles) == {"play/HAMLET", "play/OPH"}
    assert "That is the question." in roles["play/HAMLET"] and "Nymph." in roles["play/HAMLET"]


def test_assign_is_a_seeded_partition():
    docs = [(f"d{i}", "x") for i in range(10)]
    shards = assign(docs, 3, seed=1)
    assert sorted(d for s in shards for d in s) == sorted(docs)
    assert shards == assign(docs, 3, seed=1) and shards != assign(docs, 3, seed=2)
    with pytest.raises(DataError, match="every peer needs at least one"):
        assign(docs[:2], 3, seed=0)


def test_hold_out_cuts_at_a_line():
    train, held = hold_out(("d", "line one\nline two\nline three\nline four\n"), 0.3)
    assert train + held == "line one\nline two\nline three\nline four\n" and held.startswith("\n")


def test_shakespeare_by_play_gives_disjoint_plays():
    works = shakespeare_works(shakespeare_dir())
    assert len(works) >= 36 and not any(name.endswith("_f") for name, _ in works)  # one edition
    shards = assign(works, 4, seed=0)
    names = [{n for n, _ in s} for s in shards]
    assert all(a.isdisjoint(b) for i, a in enumerate(names) for b in names[i + 1 :])
    section = DataSection(block_size=64, eval_blocks=4)
    peer = load_peer_data(section, TOKENIZER, 0, 4, seed=0)
    assert peer.train.shape[1] == 64 and peer.own_eval.shape[0] == 4 and peer.global_eval.shape[0] == 4


def test_shakespeare_by_role():
    works = shakespeare_works(shakespeare_dir())
    roles = speaking_roles(("hamlet", dict(works)["hamlet"]))
    names = {n.split("/")[1] for n, _ in roles}
    assert {"HAM", "HOR"} <= names


def test_pooled_shares_give_one_process_every_peers_data_and_the_same_global_eval():
    section = DataSection(block_size=64, eval_blocks=6)
    peers = [load_peer_data(section, TOKENIZER, r, 4, seed=0) for r in range(4)]
    pooled = load_peer_data(DataSection(block_size=64, eval_blocks=6, pool=4), TOKENIZER, 0, 1, seed=0)
    # the centralised baseline trains on the union of the four peers' training text ...
    assert abs(pooled.train.shape[0] - sum(p.train.shape[0] for p in peers)) <= 4  # block tails differ per join
    # ... and is judged on exactly the blocks the four peers are judged on
    assert all(torch.equal(pooled.global_eval, p.global_eval) for p in peers)
    # two processes over four shares: each gets two peers' documents
    half = load_peer_data(DataSection(block_size=64, eval_blocks=6, pool=4), TOKENIZER, 1, 2, seed=0)
    assert half.description.count("shares 1, 3") == 1
    with pytest.raises(DataError, match=r"\[data\] pool = 2: expected 0 or at least the 4 peers"):
        load_peer_data(DataSection(block_size=64, pool=2), TOKENIZER, 0, 4, seed=0)


def test_the_role_split_gives_each_peer_whole_speaking_roles_and_all_roles_are_dealt():
    """split = 'role' through load_peer_data: peers hold disjoint speaking roles (play/ROLE),
    and together exactly the roles speaking_roles finds in every play."""
    import re

    works = shakespeare_works(shakespeare_dir())
    every_role = {name for work in works for name, _ in speaking_roles(work)}
    section = DataSection(split="role", block_size=64, eval_blocks=2)
    counts, listed = [], []
    for rank in range(2):
        data = load_peer_data(section, TOKENIZER, rank, 2, seed=0)
        found = re.match(r"shakespeare by role: (\d+) documents: (.*?)( \(\+\d+ more\))?$", data.description)
        assert found, data.description
        counts.append(int(found[1]))
        listed.append(found[2].split(", "))
        assert data.train.shape[0] > 0 and data.own_eval.shape[0] > 0
    assert sum(counts) == len(every_role) and abs(counts[0] - counts[1]) <= len(every_role) // 4
    assert set(listed[0]).isdisjoint(listed[1]) and set(listed[0] + listed[1]) <= every_role


def test_slices_cut_the_plays_into_one_near_equal_share_per_peer_at_line_boundaries():
    from p2pfed.data import text_slices

    works = [("a", "one\ntwo\nthree\n" * 40), ("b", "four five\nsix\n" * 30)]
    whole = "\n\n".join(t for _, t in works)
    for shares in (1, 3, 7, 50):
        slices = text_slices(works, shares)
        assert len(slices) == shares and "".join(t for _, t in slices) == whole  # nothing lost, nothing twice
        assert all(t for _, t in slices)
        assert all(t.endswith("\n") for _, t in slices[:-1])  # cut after a line
        longest_line = max(len(line) + 1 for line in whole.split("\n"))
        assert max(len(t) for _, t in slices) <= len(whole) / shares + longest_line
