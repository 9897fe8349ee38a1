"""Cache-blocked collaborative attention for PyTorch on CPU.

The generic path of `CollaborativeMultiHeadAttention` computes the scores of
all heads at once: at BERT-base shape and T = 512 that is a tensor of
hundreds of megabytes, written by the score product, read and written by the
softmax, read again by the context product. On CPU that memory traffic
costs more than the arithmetic. PyTorch's fused CPU kernel
(`scaled_dot_product_attention`) cannot take over: it needs equal key and
value head sizes, while the shared key has D̃ dimensions and the values
`value_dim`.

This kernel computes the same attention one block of query rows at a time
(all heads of one batch element), so each block's scores stay in cache from
the score product to the context product. The forward pass stores the
probabilities when gradients are wanted, and the backward pass again works
block by block. Recomputing them instead, as flash attention does, measured
slower: the recomputed score product is a quarter of the backward work. The
measurements are in the benchmarks README ("PyTorch CPU kernel").

Only float32 is handled (the generic path upcasts half-precision softmax, and
accelerators use the fused kernel); the layer checks `is_supported` first.
"""

import torch

# Elements of one block's (heads, rows, keys) scores: 8 MiB of float32,
# which keeps a block in a server CPU's cache (block sizes from 1 to 12 heads
# of 512 rows measured the same; benchmarks README).
BLOCK_ELEMENTS = 1 << 21


def is_supported(tensor):
    """Whether this kernel can compute attention on `tensor`'s device and
    dtype."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
    )


# Under `torch.compile` the kernel runs as it is, between compiled graphs:
# traced, its loops unroll into a graph that measured slower.
@torch.compiler.disable
def blocked_collaborative_attention(
    query, key, mixing, value, bias=None, mask=None, mask_value=-1e9
):
    """Collaborative attention, computed in cache-sized blocks.

    Args:
        query: `(B, T, D̃)` shared query, already multiplied by the scale.
        key: `(B, S, D̃)` shared key.
        mixing: `(H, D̃)` mixing vectors.
        value: `(B, S, H, value_dim)` projected values, or `(B, S,
            value_dim)` shared values `Ṽ`, which every head reads (one
            matmul per block for all heads).
        bias: Optional `(B, H, 1, S)` logits added to every query row (the
            scaled content bias).
        mask: Optional boolean mask broadcastable to `(B, H, T, S)`, of rank
            4; `False` hides a key from a query.
        mask_value: The logit given to hidden keys: large and finite, so
            that a fully masked row gets uniform probabilities, as on the
            generic path.

    Returns:
        `(B, T, H, value_dim)` context: for head h,
        `softmax((query * mixing[h]) @ key^T + bias) @ value[:, :, h]`
        (`@ value` when shared).
    """
    if mask is not None:
        batch, length = query.shape[0], query.shape[1]
        mask = mask.expand(batch, -1, length, key.shape[1])
    inputs = (query, key, mixing, value, bias)
    # Under `torch.no_grad()` the Function still sees `needs_input_grad`.
    wants_gradients = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in inputs
    )
    return _BlockedAttention.apply(*inputs, mask, mask_value, wants_gradients)


def _row_blocks(num_heads, length, keys):
    rows = max(1, BLOCK_ELEMENTS // max(1, num_heads * keys))
    return [
        (start, min(start + rows, length)) for start in range(0, length, rows)
    ]


def _block_context(probabilities, values):
    """`(H, rows, dv)` context of one block: per-head `values` `(H, S,
    dv)`, or shared ones `(S, dv)` multiplied with all heads' rows at once."""
    if values.dim() == 3:
        return torch.matmul(probabilities, values)
    heads, rows, keys = probabilities.shape
    context = torch.matmul(probabilities.reshape(heads * rows, keys), values)
    return context.reshape(heads, rows, -1)


def _block_value_gradients(probabilities, grad_context, values):
    """`(gradient of the values, gradient of the probabilities)` of one
    block, for per-head `(H, S, dv)` or shared `(S, dv)` values."""
    if values.dim() == 3:
        return (
            torch.matmul(probabilities.transpose(1, 2), grad_context),
            torch.matmul(grad_context, values.transpose(1, 2)),
        )
    heads, rows, keys = probabilities.shape
    flat_probabilities = probabilities.reshape(heads * rows, keys)
    flat_grad = grad_context.reshape(heads * rows, -1)
    return (
        torch.matmul(flat_probabilities.transpose(0, 1), flat_grad),
        torch.matmul(flat_grad, values.transpose(0, 1)).reshape(
            heads, rows, keys
        ),
    )


def _block_probabilities(head_queries, key, bias, mask, mask_value):
    """Softmax over keys of one block's logits, `(H, rows, S)`."""
    logits = torch.matmul(head_queries, key.transpose(0, 1))
    if bias is not None:
        logits += bias
    if mask is not None:
        logits.masked_fill_(~mask, mask_value)
    return torch.softmax(logits, dim=-1)


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, query, key, mixing, value, bias, mask, mask_value, wants_gradients
    ):
        batch, length, _ = query.shape
        num_heads, value_dim = mixing.shape[0], value.shape[-1]
        if value.dim() == 4:
            # (B, H, S, dv): each head's values contiguous for the products.
            head_values = value.permute(0, 2, 1, 3).contiguous()
        else:
            head_values = value.contiguous()
        output = query.new_empty(batch, length, num_heads, value_dim)
        # Stored probabilities spare the backward pass a score product
        # (about a quarter of its work); without gradients, nothing is stored.
        saved = None
        if wants_gradients:
            saved = query.new_empty(batch, num_heads, length, key.shape[1])
        blocks = _row_blocks(num_heads, length, key.shape[1])
        for b in range(batch):
            for start, stop in blocks:
                head_queries = query[b, None, start:stop] * mixing[:, None]
                probabilities = _block_probabilities(
                    head_queries,
                    key[b],
                    None if bias is None else bias[b],
                    None if mask is None else mask[b, :, start:stop],
                    mask_value,
                )
                context = _block_context(probabilities, head_values[b])
                output[b, start:stop] = context.transpose(0, 1)
                if saved is not None:
                    saved[b, :, start:stop] = probabilities
        ctx.save_for_backward(
            query, key, mixing, head_values, bias, output, saved
        )
        ctx.mask = mask
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (query, key, mixing, head_values, bias, output, saved) = (
            ctx.saved_tensors
        )
        mask = ctx.mask
        batch, length, _ = query.shape
        num_heads = mixing.shape[0]
        grad_query = torch.zeros_like(query)
        grad_key = torch.zeros_like(key)
        grad_mixing = torch.zeros_like(mixing)
        grad_values = torch.zeros_like(head_values)
        grad_bias = None if bias is None else torch.zeros_like(bias)
        blocks = _row_blocks(num_heads, length, key.shape[1])
        for b in range(batch):
            for start, stop in blocks:
                rows = query[b, start:stop]
                head_queries = rows[None] * mixing[:, None]
                block_mask = None if mask is None else mask[b, :, start:stop]
                probabilities = saved[b, :, start:stop]
                grad_context = grad_output[b, start:stop].transpose(0, 1)
                grad_block_values, grad_probabilities = _block_value_gradients(
                    probabilities, grad_context, head_values[b]
                )
                grad_values[b] += grad_block_values
                # Softmax backward: dL/dlogits = P * (dL/dP - <dL/dP, P>),
                # where <dL/dP, P> per row equals <dL/dcontext, context>.
                row_dot = (
                    grad_context * output[b, start:stop].transpose(0, 1)
                ).sum(dim=-1, keepdim=True)
                grad_logits = probabilities * (grad_probabilities - row_dot)
                if block_mask is not None:
                    # Masked logits were replaced by a constant.
                    grad_logits.masked_fill_(~block_mask, 0.0)
                if grad_bias is not None:
                    grad_bias[b] += grad_logits.sum(dim=1, keepdim=True)
                grad_head_queries = torch.matmul(grad_logits, key[b])
                grad_key[b] += torch.matmul(
                    grad_logits.transpose(1, 2), head_queries
                ).sum(dim=0)
                grad_query[b, start:stop] = (
                    grad_head_queries * mixing[:, None]
                ).sum(dim=0)
                grad_mixing += (grad_head_queries * rows[None]).sum(dim=1)
        grad_value = grad_values
        if grad_values.dim() == 4:
            grad_value = grad_values.permute(0, 2, 1, 3)
        return (
            grad_query,
            grad_key,
            grad_mixing,
            grad_value,
            grad_bias,
            None,
            None,
            None,
        )
