"""The class worker asks Ray for the memory its models take (issue 28): estimated from the recipe's models
(models/footprint.py), exact parameter counts from a local folder's safetensors headers, the paper's architectures
near what their random full-size copies measured in a Ray actor (7.2-9.2 GiB on the CPU, ENVIRONMENT.md), and passed
to Ray Data's actor pool by build_bank."""
from __future__ import annotations

from dataclasses import replace

import torch
from safetensors.torch import save_file

from ovdiff_ray.models.footprint import BASE_BYTES, WORK_MARGIN, param_count, worker_memory
from ovdiff_ray.recipe import load_recipe


def test_a_local_folder_is_sized_from_its_safetensors_headers(tmp_path):
    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.float16)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "unet").mkdir()
    save_file({"w": torch.zeros(2, 2, 2)}, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    assert param_count(str(tmp_path)) == 15 + 7 + 8
    r = load_recipe("paper")
    mine = replace(r, generation=replace(r.generation, model=str(tmp_path)),
                   extractors=[replace(e, model=str(tmp_path)) for e in r.extractors],
                   classifier=replace(r.classifier, model=str(tmp_path)))
    assert worker_memory(mine) == int(BASE_BYTES + (1 + WORK_MARGIN) * 4 * 30)  # one folder, loaded once


def test_tiny_models_ask_for_the_base_and_the_paper_for_what_it_measured():
    assert worker_memory(load_recipe("tiny")) == worker_memory(load_recipe("toy")) == BASE_BYTES
    paper = worker_memory(load_recipe("paper"))
    assert 7.2 * 2**30 <= paper <= 9.2 * 2**30, paper / 2**30
    assert worker_memory(load_recipe("paper"), gpu=True) < paper / 2  # on a GPU the host holds them only to load


def test_the_ask_is_capped_by_the_largest_node(ray_local):
    import ray

    from ovdiff_ray.build_bank import actor_memory

    r = load_recipe("paper")
    node = max(n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive"))
    assert actor_memory(r, False) == min(worker_memory(r), node)
    assert actor_memory(load_recipe("tiny"), False) == BASE_BYTES
