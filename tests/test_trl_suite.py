"""The harness that runs TRL's own trainer tests with fastdpo in place (tests/trl_suite/): the offline stand-ins load
as the hub ids they replace, the plugin puts fastdpo in place per mode, and a test that passes stock but fails with
fastdpo makes the run fail."""

import os
import textwrap

import pytest

from fdtest import load_script

pytest.importorskip("trl")
pytest.importorskip("datasets")

HERE = os.path.join(os.path.dirname(__file__), "trl_suite")


def _load(name):
    return load_script(os.path.join(HERE, f"{name}.py"))


def test_stand_ins_load_as_the_hub_ids(tmp_path, monkeypatch):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = _load("make_hub")
    assert hub.build(str(tmp_path), names={"tiny-Qwen2ForCausalLM-2.5"}) == {}
    monkeypatch.chdir(tmp_path)
    model_id = "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5"
    model = AutoModelForCausalLM.from_pretrained(model_id)
    tok = AutoTokenizer.from_pretrained(model_id)
    assert model.config.vocab_size == len(tok)
    for config, columns in (("standard_preference", {"prompt", "chosen", "rejected"}),
                            ("conversational_implicit_prompt_preference", {"chosen", "rejected"}),
                            ("standard_unpaired_preference", {"prompt", "completion", "label"})):
        data = datasets.load_dataset("trl-internal-testing/zen", config, split="train")
        assert set(data.column_names) == columns and len(data) == 17
    conv = datasets.load_dataset("trl-internal-testing/zen", "conversational_preference", split="test")
    text = tok.apply_chat_template(conv[0]["prompt"] + conv[0]["chosen"], tokenize=False)
    assert text.count("<|im_start|>") == 2 and conv[0]["chosen"][0]["content"] in text


def test_missing_trl_names_become_stubs(tmp_path):
    run = _load("run")
    path = tmp_path / "t.py"
    path.write_text("from trl.import_utils import (\n    is_nothing_available,  # note\n    nothing as other,\n)\n"
                    "from trl import DPOConfig\n")
    run.stub_missing_imports(str(path))
    ns = {}
    exec(path.read_text(), ns)
    assert ns["is_nothing_available"]() is False and ns["other"] is None
    import trl

    assert ns["DPOConfig"] is trl.DPOConfig


def test_a_test_failing_only_with_fastdpo_fails_the_run(tmp_path, capsys):
    tests = tmp_path / "trl" / "tests"
    tests.mkdir(parents=True)
    (tests / "test_dpo_trainer.py").write_text(textwrap.dedent("""
        import os

        from trl import DPOTrainer
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        MODE = os.environ["FASTDPO_SWAP"]


        def test_the_trainer_in_place():
            from fastdpo.integrations.trl import FastDPOTrainer

            assert (DPOTrainer is FastDPOTrainer) == (MODE == "trainer")


        def test_trl_head_forbidden_with_fastdpo():
            from fastdpo.integrations import _trl_patch

            assert (_trl_patch._TRL_FUNCTION.forward.__name__ == "_forbidden") == (MODE != "stock")
            assert (ChunkedLogProbFunction is not _trl_patch._TRL_FUNCTION) == (MODE == "patch")


        def test_fails_stock_too():
            assert False


        def test_fails_only_with_fastdpo():
            assert MODE == "stock"
    """))
    run = _load("run")
    assert run.main([str(tests), "--files", "dpo", "--work", str(tmp_path / "work"), "--timeout", "300"]) == 1
    out = capsys.readouterr().out
    assert "test_dpo_trainer.py stock: 1 failed, 3 passed" in out
    for mode in ("patch", "trainer"):
        assert f"test_dpo_trainer.py {mode}: 2 failed, 2 passed" in out and "failing only with fastdpo: 1" in out
    assert out.count("test_dpo_trainer.py::test_fails_only_with_fastdpo") == 2
