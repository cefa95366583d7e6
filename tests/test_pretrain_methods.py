"""SSQL pretraining in process: losses on hand-computed values, each method's loss, the quantized branch."""

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import without_zero_init
from torch import nn

from ssql_deploy.models import create_model, list_models
from ssql_deploy.pretrain import losses
from ssql_deploy.pretrain.config import METHODS
from ssql_deploy.pretrain.methods import SSQL, SSLMethod, build_method
from ssql_deploy.quant.config import STEM_BITS
from ssql_deploy.quant.placement import act_quantizers
from ssql_deploy.quant.quantizer import QuantConv2d, QuantLinear
from ssql_deploy.recipe import PretrainRecipe


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One thread: on a shared 2-core machine two OpenMP threads spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _method(name: str, backbone: nn.Module | None = None, arch: str = "test_resnet", **overrides: object) -> SSLMethod:
    info = METHODS[name]
    extra: dict[str, object] = {"pred_hidden_dim": 16} if info.pred_hidden_dim else {}
    extra |= {"queue_size": 16} if info.family == "moco" else {}
    recipe = PretrainRecipe(method=name, arch=arch, batch_size=4, proj_dim=16, proj_hidden_dim=32, **extra | overrides)
    torch.manual_seed(0)
    return build_method(recipe, backbone or create_model(arch, 1, "cifar"), torch.device("cpu"))


# --- losses on hand-computed values ------------------------------------------------------------

E1, E2 = [1.0, 0.0], [0.0, 1.0]


def test_negative_cosine_and_byol_loss_by_hand() -> None:
    p1, p2 = torch.tensor([E1]), torch.tensor([E2])
    z1, z2 = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 0.0]])
    assert float(losses.negative_cosine(p1, z2)) == pytest.approx(-1.0)
    assert float(losses.negative_cosine(p2, z1)) == pytest.approx(-1 / math.sqrt(2))
    # SimSiam: 1/2 D(p1, z2) + 1/2 D(p2, z1)
    assert float(losses.symmetric(losses.negative_cosine, p1, p2, z1, z2)) == pytest.approx(-0.5 * (1 + 1 / math.sqrt(2)))
    # BYOL: 2 - 2 cos
    assert float(losses.symmetric(losses.byol_loss, p1, p2, z1, z2)) == pytest.approx(0.5 * (0 + 2 - math.sqrt(2)))


def test_targets_receive_no_gradient() -> None:
    p = torch.randn(3, 4, requires_grad=True)
    z = torch.randn(3, 4, requires_grad=True)
    (losses.negative_cosine(p, z) + losses.byol_loss(p, z)).backward()
    assert p.grad is not None and z.grad is None


def test_info_nce_by_hand() -> None:
    q, k = torch.tensor([E1]), torch.tensor([E1])
    queue = torch.tensor([E2, [-1.0, 0.0]])
    # logits [1, 0, -1] / 0.5 = [2, 0, -2]; positive first
    expected = math.log(1 + math.exp(-2) + math.exp(-4))
    assert float(losses.info_nce(q, k, queue, 0.5)) == pytest.approx(expected)


def test_nt_xent_by_hand() -> None:
    z = torch.tensor([E1, E2])
    # each view: self masked, twin similarity 1, the two others 0 -> -log(e / (e + 2))
    assert float(losses.nt_xent(z, z.clone(), 1.0)) == pytest.approx(math.log(1 + 2 / math.e))


def test_nt_xent_split_over_processes_equals_the_global_batch() -> None:
    """What two DDP processes compute (local queries, gathered candidates) averages to the 1-process loss."""
    torch.manual_seed(0)
    z1 = nn.functional.normalize(torch.randn(6, 5), dim=1)
    z2 = nn.functional.normalize(torch.randn(6, 5), dim=1)
    whole = losses.nt_xent(z1, z2, 0.5)
    halves = [losses.nt_xent(z1[i : i + 3], z2[i : i + 3], 0.5, z1, z2, offset=i) for i in (0, 3)]
    assert float(sum(halves) / 2) == pytest.approx(float(whole), rel=1e-6)


def test_ssql_combination() -> None:
    q, fp = torch.tensor(1.0), torch.tensor(3.0)
    assert float(losses.ssql_combine(q, fp)) == 2.0  # 1/2 quantized + 1/2 full precision
    assert float(losses.ssql_combine(q, None)) == 1.0  # ablation: no auxiliary loss


def _gather_worker(rank: int, world: int, init_file: str, z1: torch.Tensor, z2: torch.Tensor, out: str) -> None:
    import torch.distributed as tdist

    from ssql_deploy.pretrain.collectives import gather_with_grad

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    n = len(z1) // world
    mine1 = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
    mine2 = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = losses.nt_xent(mine1, mine2, 0.5, gather_with_grad(mine1), gather_with_grad(mine2), rank * n)
    loss.backward()
    torch.save({"loss": loss.detach(), "g1": mine1.grad, "g2": mine2.grad}, f"{out}.{rank}")
    tdist.destroy_process_group()


def test_simclr_gradients_through_the_cross_process_gather(tmp_path: Path) -> None:
    """Two gloo processes, each with half the batch: DDP's gradient average equals the 1-process gradient."""
    torch.manual_seed(0)
    z1 = nn.functional.normalize(torch.randn(8, 5), dim=1)
    z2 = nn.functional.normalize(torch.randn(8, 5), dim=1)
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path / "store"), z1, z2, str(tmp_path / "r")), nprocs=2)
    parts = [torch.load(tmp_path / f"r.{rank}") for rank in range(2)]
    g1, g2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    whole = losses.nt_xent(g1, g2, 0.5)
    whole.backward()
    assert float(sum(p["loss"] for p in parts) / 2) == pytest.approx(whole.item(), rel=1e-5)
    averaged = torch.cat([p["g1"] for p in parts]) / 2  # what DDP's all-reduce average applies
    assert torch.allclose(averaged, g1.grad, atol=1e-6)
    assert torch.allclose(torch.cat([p["g2"] for p in parts]) / 2, g2.grad, atol=1e-6)


# --- each method's loss on known inputs ---------------------------------------------------------


def _same_views(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(n, 3, 32, 32)
    return x, x.clone()


@pytest.mark.parametrize("name", ["simsiam", "ssql"])
def test_simsiam_family_with_identity_predictor_on_identical_views(name: str) -> None:
    method = _method(name, fixed_bits="w8a8") if name == "ssql" else _method(name)
    method.predictor = nn.Identity()  # p = z, and z1 = z2 for identical views: D = -1
    loss, stats = method(*_same_views())
    assert float(stats["loss_fp"]) == pytest.approx(-1.0, abs=1e-5)
    if name == "ssql":
        assert -1.0 < float(stats["loss_q"]) < -0.9  # 8-bit branch: close to, not equal to, the float one
        assert loss.item() == pytest.approx(0.5 * (float(stats["loss_q"]) - 1.0), abs=1e-6)


@pytest.mark.parametrize("name", ["byol", "byol-ssql"])
def test_byol_family_at_init_with_identity_predictor(name: str) -> None:
    method = _method(name)
    method.predictor = nn.Identity()  # the target starts as a copy: prediction = target, loss 2 - 2 = 0
    loss, stats = method(*_same_views())
    assert float(stats["loss_fp"]) == pytest.approx(0.0, abs=1e-5)
    if name == "byol-ssql":
        assert loss.item() == pytest.approx(0.5 * float(stats["loss_q"]), abs=1e-6)


@pytest.mark.parametrize("name", ["moco", "ssql-nce"])
def test_moco_family_against_an_empty_queue(name: str) -> None:
    method = _method(name)
    method.queue.queue.zero_()  # negatives all 0: logits [1/T, 0 x K]
    loss, stats = method(*_same_views())
    t, k = method.temperature, len(method.queue.queue)
    assert float(stats["loss_fp"]) == pytest.approx(math.log(1 + k * math.exp(-1 / t)), rel=1e-4)
    if name == "ssql-nce":
        assert loss.item() == pytest.approx(0.5 * (float(stats["loss_q"]) + float(stats["loss_fp"])), abs=1e-6)
    assert int(method.queue.ptr) == 8 % k  # both views' keys (2 x 4) were enqueued


def test_simclr_on_a_batch_of_one_repeated_image() -> None:
    method = _method("simclr")
    x = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1).contiguous()
    loss, _ = method(x, x.clone())  # every embedding identical: -log(e^(1/T) / (7 e^(1/T))) = log 7
    assert loss.item() == pytest.approx(math.log(7), rel=1e-4)


def test_byol_target_follows_the_online_network_by_ema() -> None:
    method = _method("byol", ema_momentum=0.9)
    online, target = method.backbone.conv1.weight, method.target_backbone.conv1.weight
    before = target.detach().clone()
    with torch.no_grad():
        online.add_(1.0)
    method.after_step()
    assert torch.allclose(target, 0.9 * before + 0.1 * online.detach(), atol=1e-6)
    assert not target.requires_grad


# --- the quantized branch -------------------------------------------------------------------


def test_bits_are_drawn_every_step_and_reach_the_quantizers() -> None:
    method = _method("ssql")
    assert isinstance(method, SSQL)
    acts, weights = method.branch.quantizers()
    seen = []
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    for _ in range(12):
        _, stats = method(x1, x2)
        seen.append((stats["w_bits"], stats["a_bits"]))
        drawn_w = {w.bits for w in weights} - {STEM_BITS}
        drawn_a = {a.bits for a in acts} - {STEM_BITS}
        assert drawn_w <= {stats["w_bits"]} and drawn_a <= {stats["a_bits"]}
        assert method.branch.backbone.conv1.weight_quantizer.inner.bits == STEM_BITS  # the stem stays 8-bit
    assert all(2 <= w <= 8 and 4 <= a <= 8 for w, a in seen)
    assert len(set(seen)) > 3, seen
    fixed = _method("ssql", fixed_bits="w4a4")
    assert {fixed(x1, x2)[1]["w_bits"] for _ in range(4)} == {4}


@pytest.mark.parametrize("arch", sorted(s.name for s in list_models() if s.name.startswith("test_")))
def test_every_method_pretrains_every_family(arch: str, fmnist_batch: torch.Tensor) -> None:
    """One step of each method on each family's tiny model: a finite loss, gradients in every conv of the backbone, and
    for the SSQL variants the drawn widths on every quantized layer but the stem."""
    x1, x2 = fmnist_batch[:4], fmnist_batch[4:8].flip(-1)
    for name, info in METHODS.items():
        method = _method(name, arch=arch, **({"fixed_bits": "w3a5"} if info.ssql else {}))
        method.train()
        loss, _ = method(x1, x2)
        loss.backward()
        assert torch.isfinite(loss), (arch, name)
        convs = [(n, m) for n, m in method.backbone.named_modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(m.weight.grad is not None for _, m in convs), (arch, name)
        if info.ssql:
            acts, weights = method.branch.quantizers()  # type: ignore[attr-defined]
            assert {w.bits for w in weights} == {3, STEM_BITS} and {a.bits for a in acts} == {5, STEM_BITS}, (arch, name)


def test_gradients_reach_the_shared_convs_through_the_quantized_branch_alone() -> None:
    backbone = without_zero_init(create_model("test_resnet", 1, "cifar"))  # no zero gamma hiding gradients
    method = _method("ssql", backbone=backbone, aux_loss=False)  # loss = quantized term only
    loss, stats = method(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert "loss_fp" not in stats
    loss.backward()
    convs = [(n, m) for n, m in method.backbone.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 12
    for name, conv in convs:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, name
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in linears)  # via QuantLinear


def test_weights_are_quantized_once_per_pass_with_unchanged_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssql_deploy.pretrain import ssql_branch

    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)

    def grads(method: SSLMethod) -> dict[str, torch.Tensor]:
        loss, _ = method(x1, x2)
        loss.backward()
        return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    method = _method("ssql", aux_loss=False, fixed_bits="w3a5")
    assert isinstance(method, SSQL)
    calls = []
    method.branch.backbone.conv1.weight_quantizer.inner.register_forward_hook(lambda *_: calls.append(1))
    memoized = grads(method)
    assert len(calls) == 1  # two views, one quantization of the stem weights

    monkeypatch.setattr(ssql_branch._OncePerPass, "forward", lambda self, w: self.inner(w))  # recompute per view
    recomputed = grads(_method("ssql", aux_loss=False, fixed_bits="w3a5"))
    assert memoized.keys() == recomputed.keys()
    for name in memoized:
        assert torch.allclose(memoized[name], recomputed[name], rtol=1e-5, atol=1e-7), name


def test_relus_merged_into_their_quantizers_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssql_deploy.pretrain import ssql_branch

    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)

    def run(method: SSLMethod) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, _ = method(x1, x2)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    def relu_calls(method: SSLMethod) -> int:
        assert isinstance(method, SSQL)
        twin = method.branch.backbone
        return sum(n.op == "call_module" and isinstance(twin.get_submodule(n.target), nn.ReLU) for n in twin.graph.nodes)

    merged = _method("ssql", fixed_bits="w3a4")
    assert isinstance(merged, SSQL)
    twin = merged.branch.backbone
    assert relu_calls(merged) == 0
    assert sum(isinstance(m, ssql_branch._ReLUThenQuantize) for m in twin.children()) == len(act_quantizers(twin))
    loss, grads = run(merged)

    monkeypatch.setattr(ssql_branch, "_merge_relus", lambda gm: None)  # ReLU, then the quantizer
    plain = _method("ssql", fixed_bits="w3a4")
    assert relu_calls(plain) == len(act_quantizers(twin))
    plain_loss, plain_grads = run(plain)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name


def test_float_and_quantized_forwards_share_parameters() -> None:
    method = _method("ssql")
    assert isinstance(method, SSQL)
    twin = method.branch.backbone
    for name, module in method.backbone.named_modules():
        if isinstance(module, nn.Conv2d):
            twin_conv = twin.get_submodule(name)
            assert isinstance(twin_conv, QuantConv2d) and twin_conv.weight is module.weight, name
        elif isinstance(module, nn.BatchNorm2d):
            assert twin.get_submodule(name) is module, name
    for float_layer, quant_layer in zip(method.projector, method.branch.quant_projector, strict=True):
        if isinstance(float_layer, nn.Linear):
            assert isinstance(quant_layer, QuantLinear) and quant_layer.weight is float_layer.weight
            assert quant_layer.weight_quantizer.inner.bits == 8
        else:
            assert quant_layer is float_layer
    # one copy of the weights: the twin adds nothing to the state dict
    assert not any("aq_" in key or "quantizer" in key for key in method.state_dict())
    # the float pass through the twin is the float network, and an update to it shows in the twin
    method.eval()
    x = torch.randn(2, 3, 32, 32)
    method.branch.float_pass()
    assert torch.equal(twin(x), method.backbone(x))
    with torch.no_grad():
        method.backbone.conv1.weight.mul_(0.5)
    assert torch.equal(twin(x), method.backbone(x))


def test_ranges_come_from_the_same_steps_float_forward() -> None:
    """4 passes per step (float and quantized per view), no observer pass, ranges reset every step."""
    method = _method("ssql")
    assert isinstance(method, SSQL)
    calls = []
    method.backbone.bn1.register_forward_hook(lambda *_: calls.append(1))
    twin, net = method.branch.backbone, method.backbone
    stem_point = next(name for name, p in twin.quant_points.items() if p.bits == STEM_BITS)
    stem_q = act_quantizers(twin)[stem_point]

    def stem_activation(x: torch.Tensor) -> torch.Tensor:  # what the float pass sees after the stem ReLU
        with torch.no_grad():
            return torch.relu(nn.functional.batch_norm(net.conv1(x), None, None, net.bn1.weight, net.bn1.bias, True))

    torch.manual_seed(2)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    spiky = x1.clone()
    spiky[0, :, 7, 7] = 60.0  # one outlier pixel: a much larger stem activation in this step only
    method(spiky, x2)
    assert len(calls) == 4
    first = float(stem_q.hi)
    assert first == pytest.approx(float(torch.maximum(stem_activation(spiky).max(), stem_activation(x2).max())), rel=1e-5)
    method(x1, x2)
    assert float(stem_q.hi) == pytest.approx(float(torch.maximum(stem_activation(x1).max(), stem_activation(x2).max())), rel=1e-5)
    assert float(stem_q.hi) < first  # reset each step, not a running max
    assert all(q.enabled and not q.observing for q in act_quantizers(twin).values())


@pytest.mark.parametrize("name", ["simsiam", "ssql"])
def test_default_heads_have_the_reference_cifar_parameter_count(name: str) -> None:
    """configs/cifar/resnet18_{simsiam,ssql_simsiam}_cifar.yaml: DIM = HIDDEN_DIM = 2048 for projector and predictor."""
    method = build_method(PretrainRecipe(method=name, arch="resnet18"), create_model("resnet18", 1, "cifar"), torch.device("cpu"))
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    backbone = sum(p.numel() for n, p in create_model("resnet18", 1, "cifar").named_parameters() if not n.startswith("fc."))
    d, h, feat = 2048, 2048, 512
    projector = feat * h + 2 * h + h * h + 2 * h + h * d  # Linear-BN-ReLU x2, Linear (bias frozen in the reference), BN without affine
    predictor = d * h + 2 * h + h * d + d  # Linear-BN-ReLU, Linear with bias
    assert trainable == backbone + projector + predictor
