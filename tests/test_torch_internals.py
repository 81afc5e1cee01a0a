"""The private torch names of ``mfu_callbacks._torch_internals``: each still exists and means what the
FLOP engine takes it to mean in the installed torch, and no other module of the package uses one."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import mfu_callbacks
from mfu_callbacks import _torch_internals as internals
from mfu_callbacks._torch_internals import rerouted
from mfu_callbacks.flops.meta_copy.trace import MatmulRecorder

PACKAGE = Path(mfu_callbacks.__file__).parent
INTERNALS = Path(internals.__file__).parent  # the one home of every private torch name


# -- dispatch and aten kernels -----------------------------------------------------------------------
class OperationLog(internals.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_the_dispatch_mode_is_the_one_torchs_own_flop_counter_builds_on():
    from torch.utils._python_dispatch import TorchDispatchMode

    assert internals.TorchDispatchMode is TorchDispatchMode
    with FlopCounterMode(display=False) as counter:
        torch.ones(2, 3) @ torch.ones(3, 4)
    assert counter.get_total_flops() == 2 * 2 * 3 * 4


def test_a_dispatch_mode_is_listed_while_entered_and_left_only_from_the_top_of_the_stack():
    from torch.utils._python_dispatch import _push_mode

    outer, inner = OperationLog(), OperationLog()
    with outer, inner:
        assert internals.dispatch_mode_stack() == [outer, inner]
        assert not internals.leave_dispatch_mode(outer)  # not the innermost: it stays
        assert internals.dispatch_mode_stack() == [outer, inner]
    assert internals.dispatch_mode_stack() == []
    mode = OperationLog().__enter__()
    assert internals.leave_dispatch_mode(mode) and internals.dispatch_mode_stack() == []
    assert not internals.leave_dispatch_mode(mode)
    _push_mode(mode)  # back after it left, as the autograd engine's saved thread state puts it back
    assert internals.leave_dispatch_mode(mode) and internals.dispatch_mode_stack() == []


def test_reading_a_value_back_dispatches_the_read_scalar_kernel():
    with OperationLog() as log:
        torch.tensor([True]).any().item()
    assert internals.READ_SCALAR in log.ops


def test_a_tensor_assertion_reads_back_the_assertion_kernel():
    """torch._check_tensor_all (transformers' torch_compilable_check) reduces with ASSERTION, then reads it."""
    with OperationLog() as log:
        torch._check_tensor_all(torch.tensor([True, True]))
    assert log.ops[-2:] == [internals.ASSERTION, internals.READ_SCALAR]


def test_a_custom_functions_forward_is_told_apart_from_no_grad_and_names_the_functions_node():
    seen: list = []

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(internals.custom_function_forward())
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    x = torch.ones(2, requires_grad=True)
    y = Double.apply(x * 3)
    assert seen == [internals.node_sequence_number(y.grad_fn)]
    assert internals.custom_function_forward() is None
    with torch.no_grad():
        assert internals.custom_function_forward() is None
    with torch.inference_mode():
        assert internals.custom_function_forward() is None


def test_the_convolution_kernel_takes_the_arguments_of_convolution_first():
    public = [argument.name for argument in torch.ops.aten.convolution.default._schema.arguments]
    kernel = [argument.name for argument in internals.CONVOLUTION_KERNEL._schema.arguments]
    assert (
        kernel[:9]
        == public[:9]
        == [
            "input",
            "weight",
            "bias",
            "stride",
            "padding",
            "dilation",
            "transposed",
            "output_padding",
            "groups",
        ]
    )


def test_the_tensors_a_subclass_wraps_are_read_by_its_flatten_protocol():
    from tests.helpers.fp8 import float8_tensor

    weight = nn.Parameter(torch.randn(4, 8))
    wrapped = float8_tensor(weight.detach())
    assert [t.dtype for t in internals.wrapped_tensors(wrapped)] == [torch.float8_e4m3fn, torch.float32]
    assert internals.wrapped_tensors(weight) == [] and internals.wrapped_tensors(torch.ones(2)) == []


def test_every_fused_attention_kernel_exists_and_is_counted_on_the_meta_device():
    for name in internals.FUSED_ATTENTION_NAMES:
        assert hasattr(torch.ops.aten, name), name
    assert {op.overloadpacket for op in internals.FUSED_ATTENTION} == {
        getattr(torch.ops.aten, name) for name in internals.FUSED_ATTENTION_NAMES
    }
    batch, heads, length, dim = 2, 3, 5, 8
    query = nn.Parameter(torch.empty(batch, heads, length, dim, device="meta"))
    forward = 2 * batch * heads * length * length * (dim + dim)
    # A trainable parameter's gradient is needed; a tensor merely made to require one is only run.
    for parameter_ids, needed, forced in (({id(query)}, 2 * forward, 0), (set(), 0, 2 * forward)):
        recorder = MatmulRecorder(parameter_ids)
        with torch.enable_grad(), recorder:
            output = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, query, query)
        totals = recorder.finish(output[0])
        assert sum(c.forward for c in totals.values()) == forward
        assert sum(c.backward for c in totals.values()) == needed
        assert sum(c.forced for c in totals.values()) == forced


def test_view_base_is_the_parameter_a_transpose_was_taken_of():
    weight = nn.Parameter(torch.empty(2, 3))
    assert internals.view_base(weight.t()) is weight
    assert internals.view_base(weight) is weight


# -- modules ---------------------------------------------------------------------------------------
def test_every_public_hook_registration_lands_in_a_named_hook_dict():
    module = nn.Linear(2, 2)
    names = internals.FORWARD_HOOK_DICTS + internals.OTHER_HOOK_DICTS
    assert all(isinstance(getattr(module, name), dict) and not getattr(module, name) for name in names)

    def hook(*args, **kwargs):
        return None

    module.register_forward_hook(hook)
    module.register_forward_pre_hook(hook)
    module.register_full_backward_hook(hook)
    module.register_full_backward_pre_hook(hook)
    module.register_state_dict_pre_hook(hook)
    module.register_state_dict_post_hook(hook)
    module.register_load_state_dict_pre_hook(hook)
    module.register_load_state_dict_post_hook(hook)
    assert list(internals.module_hook_dicts(module, names)) == [getattr(module, name) for name in names]
    hooks = [h for d in internals.module_hook_dicts(module, names) for h in d.values()]
    assert len(hooks) == 8  # each registration found in exactly one of the dicts


def test_every_global_hook_registration_lands_in_a_named_dict_and_is_back_after_the_limit():
    from torch.nn.modules import module as torch_module

    def hook(*args, **kwargs):
        return None

    def kept(*args, **kwargs):
        return None

    registrations = (
        torch_module.register_module_forward_pre_hook,
        torch_module.register_module_forward_hook,
        torch_module.register_module_full_backward_pre_hook,
        torch_module.register_module_full_backward_hook,
    )
    before = [dict(hooks) for hooks in internals.global_module_hooks()]
    handles = [register(hook) for register in registrations] + [register(kept) for register in registrations]
    try:
        added = [
            [h for key, h in hooks.items() if key not in old]
            for hooks, old in zip(internals.global_module_hooks(), before)
        ]
        assert added == [[hook, kept]] * 4  # each registration found in exactly one of the dicts
        with internals.global_module_hooks_limited_to(lambda h: h is not hook):
            assert all(
                hook not in hooks.values() and kept in hooks.values()
                for hooks in internals.global_module_hooks()
            )
        after = [
            [h for key, h in hooks.items() if key not in old]
            for hooks, old in zip(internals.global_module_hooks(), before)
        ]
        assert after == added, "every hook is back, in its order"
    finally:
        for handle in handles:
            handle.remove()


def test_a_hook_for_every_module_reads_the_keyword_arguments_of_the_call():
    from torch.nn.modules import module as torch_module

    class Model(nn.Module):
        def forward(self, ids, mask=None):
            return ids

    model, seen = Model(), []
    hook = torch.compiler.disable(lambda module, args: seen.append((args, internals.call_keywords(module))))
    handle = torch_module.register_module_forward_pre_hook(hook)
    try:
        ids, mask = torch.ones(2), torch.zeros(2)
        model(ids, mask=mask)
        model(ids)
    finally:
        handle.remove()
    assert seen[0][0] == (ids,) and seen[0][1] == {"mask": mask}
    assert seen[1][1] == {}
    assert internals.call_keywords(model) is None  # no call of it running


def test_composable_distributed_apis_keep_their_state_under_the_prefixed_keys():
    if not torch.distributed.is_available():
        pytest.skip("torch built without torch.distributed")
    import importlib

    contract = importlib.import_module(
        "torch.distributed._composable.contract"
    )  # the package shadows it with a function

    assert contract.STATE_KEY.startswith(internals.COMPOSABLE_STATE_KEY_PREFIX)
    assert contract.REGISTRY_KEY.startswith(internals.COMPOSABLE_STATE_KEY_PREFIX)


def test_fsdp2_state_names_each_managed_parameter_and_the_spec_it_gathers_back_to(tmp_path):
    """FSDP2 alone gathers a plain tensor (no spec); the tensor-parallel spec it gathers back to is
    checked in tests/flops/test_parallel.py, where a mesh of several ranks exists."""
    if not torch.distributed.is_available():
        pytest.skip("torch built without torch.distributed")
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        fully_shard(model[0])
        fully_shard(model)
        inner, outer = internals.fsdp2_unsharded_specs(model[0]), internals.fsdp2_unsharded_specs(model)
        assert inner == {id(p): None for p in model[0].parameters()}
        assert outer == {id(p): None for p in model[1].parameters()}
        assert internals.fsdp2_unsharded_specs(nn.Linear(2, 2)) == {}
    finally:
        dist.destroy_process_group()


def test_torch_linear_is_put_back_in_this_thread_only_where_deepspeed_replaced_it(monkeypatch):
    assert internals.TORCH_LINEAR is torch.nn.functional.linear

    def replaced(input, weight, bias=None):
        raise AssertionError("the replaced linear ran")

    with internals.torch_linear():  # nothing replaced: nothing to do
        assert torch.nn.functional.linear is internals.TORCH_LINEAR
    replaced.__module__ = "deepspeed.runtime.zero.linear"
    monkeypatch.setattr(torch.nn.functional, "linear", replaced)
    x, w = torch.ones(2, 3), torch.ones(4, 3)
    seen = []
    with internals.torch_linear():
        assert torch.nn.functional.linear(x, w).shape == (2, 4)
        other = threading.Thread(
            target=lambda: seen.append(_raises(lambda: torch.nn.functional.linear(x, w)))
        )
        other.start()
        other.join()
    assert seen == [True]  # another thread still gets DeepSpeed's
    assert torch.nn.functional.linear is replaced
    replaced.__module__ = "my_project.layers"  # a replacement of the user's own is left alone
    with internals.torch_linear():
        assert torch.nn.functional.linear is replaced


def _raises(call) -> bool:
    try:
        call()
    except AssertionError:
        return True
    return False


def test_the_compile_wrapper_keeps_the_model_under_its_named_attribute():
    model = nn.Linear(2, 2)
    compiled = torch.compile(model)
    assert type(compiled).__name__ == internals.COMPILED_WRAPPER
    assert getattr(compiled, internals.COMPILED_ORIGINAL) is model


# -- activation checkpointing ----------------------------------------------------------------------
def test_checkpoint_internals_exist_with_the_parameters_the_routing_binds():
    import inspect

    assert hasattr(torch_checkpoint.CheckpointFunction, "apply")
    generator = getattr(torch_checkpoint, rerouted._NON_REENTRANT)
    parameters = list(inspect.signature(generator).parameters)
    assert parameters[:6] == [
        "fn",
        "preserve_rng_state",
        "context_fn",
        "determinism_check",
        "debug",
        "early_stop",
    ]
    assert getattr(torch_checkpoint, rerouted._EARLY_STOP_OVERRIDE) is None
    with torch_checkpoint.set_checkpoint_early_stop(False):
        assert getattr(torch_checkpoint, rerouted._EARLY_STOP_OVERRIDE) is False


def test_checkpoint_calls_are_routed_while_active_and_restored_after():
    from contextlib import contextmanager

    calls = []

    def reentrant(function, *args):
        calls.append(("reentrant",))
        return function(*args)

    @contextmanager
    def region(early_stop):
        calls.append(("region", early_stop))
        yield

    x = torch.ones(2, requires_grad=True)
    original = (torch_checkpoint.CheckpointFunction, getattr(torch_checkpoint, rerouted._NON_REENTRANT))
    with internals.checkpoint_routed_to(reentrant, region):
        torch_checkpoint.checkpoint(torch.sin, x, use_reentrant=True)
        torch_checkpoint.checkpoint(torch.sin, x, use_reentrant=False)
        torch_checkpoint.checkpoint(torch.sin, x, use_reentrant=False, early_stop=False)
        with torch_checkpoint.set_checkpoint_early_stop(False):
            torch_checkpoint.checkpoint(torch.sin, x, use_reentrant=False, early_stop=True)
    assert calls == [("reentrant",), ("region", True), ("region", False), ("region", False)]
    assert (
        torch_checkpoint.CheckpointFunction,
        getattr(torch_checkpoint, rerouted._NON_REENTRANT),
    ) == original


# -- flex_attention on the meta device ------------------------------------------------------------
def test_flex_attention_looks_up_the_rerouted_names_in_its_module_and_its_mask_tuple_is_laid_out_as_read():
    import importlib

    from torch.nn.attention.flex_attention import create_block_mask

    module = importlib.import_module(rerouted._FLEX_MODULE)
    for name in (rerouted._FLEX_VALIDATE_DEVICE, rerouted._FLEX_OP, rerouted._FLEX_NO_COMPILE):
        assert hasattr(module, name), name
    names = module.flex_attention.__code__.co_names
    assert rerouted._FLEX_VALIDATE_DEVICE in names and rerouted._FLEX_NO_COMPILE in names

    def causal(batch, head, q, kv):
        return q >= kv

    mask = create_block_mask(causal, 1, 2, 32, 48, device="cpu", BLOCK_SIZE=(16, 8))
    layout = mask.as_tuple()
    assert layout[internals.FLEX_MASK_LENGTHS] == (32, 48)
    assert layout[internals.FLEX_MASK_KV_NUM_BLOCKS] is mask.kv_num_blocks
    assert layout[internals.FLEX_MASK_FULL_KV_NUM_BLOCKS] is mask.full_kv_num_blocks
    assert layout[internals.FLEX_MASK_BLOCK_SIZES] == (16, 8)
    assert layout[internals.FLEX_MASK_MOD] is causal


def test_flex_attention_on_meta_runs_the_kernel_in_this_thread_only_and_is_undone_after():
    import importlib

    from torch.nn.attention.flex_attention import flex_attention

    module = importlib.import_module(rerouted._FLEX_MODULE)
    names = (rerouted._FLEX_VALIDATE_DEVICE, rerouted._FLEX_OP, rerouted._FLEX_NO_COMPILE)
    original = [getattr(module, name) for name in names]
    query = torch.empty(1, 2, 8, 4, device="meta", requires_grad=True)
    calls = []

    def kernel(q, k, v, score_mod, block_mask, *args):
        calls.append(block_mask[internals.FLEX_MASK_LENGTHS])
        empty = torch.empty(1, 2, 8, device="meta")
        return torch.empty(1, 2, 8, 4, device="meta"), empty, empty

    in_other_thread = []
    with internals.flex_attention_on_meta(kernel):
        assert flex_attention(query, query, query).shape == (1, 2, 8, 4)
        worker = threading.Thread(target=lambda: in_other_thread.append(raised(flex_attention, query)))
        worker.start()
        worker.join()
    assert len(calls) == 1
    assert isinstance(in_other_thread[0], ValueError)  # meta is refused as without the context
    assert [getattr(module, name) for name in names] == original
    assert isinstance(raised(flex_attention, query), ValueError)


def raised(function, query: torch.Tensor) -> BaseException | None:
    try:
        function(query, query, query)
    except Exception as error:  # noqa: BLE001
        return error
    return None


# -- autocast on the meta device -------------------------------------------------------------------
def meta_autocast_error() -> BaseException | None:
    try:
        with torch.autocast(device_type="meta", enabled=False):
            pass
    except Exception as error:  # noqa: BLE001
        return error
    return None


def test_autocast_refuses_the_meta_device_and_the_error_is_recognised():
    """If torch starts accepting autocast on the meta device, the patch can go: this test says so."""
    error = meta_autocast_error()
    assert error is not None, "torch.autocast accepts the meta device now: meta_autocast_as_cpu is not needed"
    assert internals.raised_by_meta_autocast(error)
    assert not internals.raised_by_meta_autocast(ValueError("unrelated"))


def test_meta_autocast_is_accepted_only_in_this_thread_and_only_while_active():
    original = torch.autocast
    in_other_thread = []
    with internals.meta_autocast_as_cpu():
        assert meta_autocast_error() is None
        worker = threading.Thread(target=lambda: in_other_thread.append(meta_autocast_error()))
        worker.start()
        worker.join()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert in_other_thread[0] is not None
    assert torch.autocast is original and torch.amp.autocast is original
    assert meta_autocast_error() is not None


# -- one module for all of them --------------------------------------------------------------------
PRIVATE_TORCH = re.compile(
    r"torch(\.\w+)*\._(?!_)\w"  # torch._dynamo, torch.utils._python_dispatch, ... (not dunders: __version__)
    r"|aten\._\w"  # private aten kernels
    r"|\._base\b|_orig_mod|_forward_hooks|_forward_pre_hooks|_backward_hooks|_backward_pre_hooks"
    r"|_state_dict_hooks|_state_dict_pre_hooks|_load_state_dict_\w*hooks|\._modules\b|__composable_api"
    r"|CheckpointFunction|_checkpoint_without_reentrant|_enable_checkpoint_early_stop"
    r"|_fsdp_wrapped_module|_param_infos|_shared_param_infos|\bflat_param\b"
    r"|_global_\w*hooks|_validate_device|flex_attention_hop|_FLEX_ATTENTION"
    r"|torch\.(amp\.)?autocast\s*="
)


def test_no_other_module_of_the_package_names_a_private_torch_attribute():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if INTERNALS in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE_TORCH.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "private torch names belong in mfu_callbacks/_torch_internals/:\n" + "\n".join(
        offenders
    )
