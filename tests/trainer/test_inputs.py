"""What a run's inputs must agree on, refused in one line before any weight is loaded: the two
models' tokenizers, each tokenizer against its model, positions against max_position_embeddings,
and bounds one key sets on another."""

import json

import pytest

from topd_jax import train
from topd_jax.configuration import ConfigError
from topd_jax.models.families import config_to_hf
from topd_jax.trainer.config import RandomModelConfig, load_config
from topd_jax.trainer.inputs import check_bounds, check_inputs

VOCAB = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hello", "world", "be", "brief"]


def make_tokenizer(vocab, eos):
    """A word-level tokenizer of `vocab` (ids in order) whose EOS is `eos`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token=eos,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])

TINY = ["rollout.max_new_tokens=8", "data.prompt_length=5", "loss.window=3", "loss.max_candidates=2",
        "logging.progress=false", "logging.tensorboard=false", "steps=1"]


def model_dir(path, vocab=VOCAB, eos="<|im_end|>", **config):
    """A checkpoint directory with config.json and tokenizer files but no weights: a check that
    read weights would fail on it with another error."""
    path.mkdir()
    hf = {**config_to_hf(RandomModelConfig().model_config(), dtype="float32"), **config}
    (path / "config.json").write_text(json.dumps(hf))
    if vocab is not None:
        make_tokenizer(vocab, eos=eos).save_pretrained(path)
    return str(path)


def config(tmp_path, *extra):
    return load_config("configs/tiny_cpu.yaml", [f"output_dir={tmp_path / 'run'}", *TINY, *extra])


def test_a_teacher_with_permuted_token_ids_is_refused_before_any_weight_is_read(tmp_path, capsys):
    student = model_dir(tmp_path / "s")
    teacher = model_dir(tmp_path / "t", VOCAB[:6] + ["world", "hello"] + VOCAB[8:])
    assert train.main(["--config", "configs/tiny_cpu.yaml", f"output_dir={tmp_path / 'run'}", *TINY,
                       f"student.path={student}", f"teacher.path={teacher}"]) == 2
    assert capsys.readouterr().err == (
        "error: the student's and teacher's tokenizers differ: token 'hello' is id 6 in the student's tokenizer but "
        f"id 7 in the teacher's ({student} vs {teacher}); TOPD compares the two models' log-probs id by id, so they "
        "must share one tokenizer\n")
    assert not (tmp_path / "run").exists()


def test_a_teacher_with_other_words_and_eos_is_refused_naming_the_eos(tmp_path):
    other = ["[UNK]", "<|im_start|>", "<|im_end|>", "a", "b", "c", "d", "e", "<eos>", "f"]
    cfg = config(tmp_path, f"student.path={model_dir(tmp_path / 's')}",
                 f"teacher.path={model_dir(tmp_path / 't', other, eos='<eos>')}")
    with pytest.raises(ConfigError, match=r"tokenizers differ: eos token '<\|im_end\|>' \(id 2\) in the student's "
                                          r"tokenizer but '<eos>' \(id 8\) in the teacher's"):
        check_inputs(cfg)


def test_the_same_tokenizer_on_both_sides_passes(tmp_path):
    cfg = config(tmp_path, f"student.path={model_dir(tmp_path / 's')}", f"teacher.path={model_dir(tmp_path / 't')}")
    assert check_inputs(cfg) == []


def test_a_model_without_a_tokenizer_beside_one_with_is_a_warning_naming_what_was_not_checked(tmp_path):
    student = model_dir(tmp_path / "s")
    [warning] = check_inputs(config(tmp_path, f"student.path={student}"))
    assert warning == ("tokenizers not compared: the teacher is a random model, so only vocab_size (128) was checked "
                       "against the student's tokenizer; its token ids, special tokens and EOS are assumed to match")
    bare = model_dir(tmp_path / "t", vocab=None)
    [warning] = check_inputs(config(tmp_path, f"student.path={student}", f"teacher.path={bare}"))
    assert warning.startswith(f"tokenizers not compared: teacher.path {bare} has no tokenizer files, ")


def test_a_tokenizer_larger_than_its_model_is_refused(tmp_path):
    student = model_dir(tmp_path / "s", vocab_size=8)
    with pytest.raises(ConfigError, match=f"student.path {student}: its tokenizer has ids up to 9, but the model's "
                                          "vocab_size is 8"):
        check_inputs(config(tmp_path, f"student.path={student}", "teacher.random.vocab_size=8"))


def test_positions_past_max_position_embeddings_are_refused(tmp_path):
    teacher = model_dir(tmp_path / "t", max_position_embeddings=14)
    with pytest.raises(ConfigError) as err:
        check_inputs(config(tmp_path, f"teacher.path={teacher}"))
    assert str(err.value) == (
        "data.prompt_length 5 + rollout.max_new_tokens 8 + loss.window 3 - 1 (a window branches from the last "
        "completion position at most) = 15 positions, but the teacher's max_position_embeddings is 14; shorten the "
        "prompts, completions or windows")
    check_inputs(config(tmp_path, f"teacher.path={teacher}", "loss.window=2"))  # 14 fit


@pytest.mark.parametrize("overrides, message", [
    (["loss.max_candidates=100000"], "loss.max_candidates: 100000 positions per rollout, but a rollout has only "
                                     "rollout.max_new_tokens=8 positions; use at most 8"),
    (["loss.num_reference=9"], "loss.num_reference: 9 positions per rollout"),
])
def test_bounds_across_sections_are_one_line_before_anything_is_built(tmp_path, capsys, overrides, message):
    keys = {o.split("=")[0] for o in overrides}  # the command line refuses a key given twice
    base = [o for o in TINY if o.split("=")[0] not in keys]
    assert train.main(["--config", "configs/tiny_cpu.yaml", f"output_dir={tmp_path / 'run'}", *base, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    check_bounds(load_config("configs/tiny_cpu.yaml", [*base, *overrides, "preset=opd"]))  # OPD: no candidates
