"""benchmarks/train.py's online-teacher baseline: the same teacher path as extraction (trimmed text)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SPEC = importlib.util.spec_from_file_location("bench_train", Path(__file__).parents[1] / "benchmarks" / "train.py")
bench_train = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_train)


def test_online_teacher_trims_captions_to_the_batch_s_longest():
    """The baseline's text tower sees as many tokens as the longest caption has (SOT … EOT), not the
    77 of the context, and gives extraction's embeddings: "cached ÷ online" compares like with like."""
    online = bench_train.OnlineTeacher("tiny-clip")
    teacher = online.teacher
    captions = ["a red circle", "a small blue square to the left of a big green triangle", "a cross"]
    widths: list[int] = []
    hook = teacher._tower.module.token_embedding.register_forward_hook(
        lambda module, args, out: widths.append(args[0].shape[1]))
    size = teacher.preprocess.size
    batch = {"image": torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8), "captions": captions}
    try:
        out = online.targets(batch)
    finally:
        hook.remove()
    longest = int(teacher.tokenize(captions).argmax(dim=-1).max()) + 1  # EOT has the largest id
    assert widths == [longest] and longest < teacher.context_length == 77
    extracted = torch.nn.functional.normalize(teacher.encode_texts(captions), dim=-1)
    torch.testing.assert_close(out["t_txt"], extracted, rtol=0, atol=0)
    assert out["t_img"].shape == (3, teacher.embed_dim)
    torch.testing.assert_close(out["t_img"].norm(dim=-1), torch.ones(3))
