"""SAM's mask decoder rewritten for inference with few prompt tokens: the same function, less work.

:class:`FactorisedMaskDecoder` computes ``MaskDecoder.predict_masks`` from the decoder's own
weights (nothing is trained or approximated; outputs agree with the direct form to float
rounding, ``tests/unit/test_factorised_decoder.py``). It is what the graph engines export for the
usual clinician prompts; the direct form stays for many tokens (:func:`max_factorised_prompt_tokens`).

Two rewrites, both by associativity of the matrix products:

- **Cross attention without image projections.** A head's attention logit between a token and an
  image position is ``(x_t W_q + b_q) · (y_n W_k + b_k)``. With few tokens, folding the tokens
  into the weights first (``x_t W_q W_kᵀ``: tokens × embedding) costs ``heads × tokens`` products
  per image position, where projecting every position costs the attention's internal width (128 in
  SAM). Token → image: ``b_k`` adds a constant per token and head, which the softmax over the
  image cancels, and the value projection is applied after the weighted sum (weights sum to 1).
  Image → token: the output projection is folded into the tokens' values. In SAM's decoder
  (8 heads, internal width 128) this does less work while ``heads × (5 + prompt tokens) ≤ 128``,
  i.e. up to 11 prompt tokens (points, box corners); with more, the direct form is cheaper.
- **Upscaling in token layout.** A 2×2 stride-2 transposed convolution is a matrix product per
  position followed by a pixel shuffle, and ``LayerNorm2d`` is a layer norm over the channels of
  each output pixel: both run on the ``positions × channels`` tokens the transformer produces,
  with one final reordering of the (small) mask logits instead of transposes of the feature maps.

Measured (64×64 embedding, 2 prompt tokens, README "Measured numbers"): the mask decoder graph
42.7 → 25.2 ms on a 2-core AVX2-only EPYC (ONNX Runtime fp32), 25.2 → 19.2 ms on a 2-core Zen 4
(OpenVINO bf16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Part of the exported file's cache key: a change to this formulation must not reuse old files.
FACTORISED_DECODER_VERSION = 2


def output_token_count(decoder: nn.Module) -> int:
    """The tokens SAM's decoder puts before the prompt tokens: the IoU token and the mask tokens."""
    return 1 + int(decoder.num_mask_tokens)


def max_factorised_prompt_tokens(decoder: nn.Module) -> int:
    """The most sparse prompt tokens for which :class:`FactorisedMaskDecoder` does no more
    attention arithmetic than the direct form: ``heads × tokens ≤ internal width`` in every cross
    attention (11 for SAM's decoder); -1 when it never does."""
    attentions = [layer.cross_attn_token_to_image for layer in decoder.transformer.layers]
    attentions += [layer.cross_attn_image_to_token for layer in decoder.transformer.layers]
    attentions.append(decoder.transformer.final_attn_token_to_image)
    most_tokens = min(attention.internal_dim // attention.num_heads for attention in attentions)
    return max(-1, most_tokens - output_token_count(decoder))


def _head_weights(linear: nn.Linear, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection's weight as ``heads × width × in`` and its bias as ``heads × width``."""
    weight = linear.weight
    width = weight.shape[0] // heads
    return weight.view(heads, width, weight.shape[1]), linear.bias.view(heads, width)


def _split_heads(x: torch.Tensor, heads: int, width: int) -> torch.Tensor:
    """``B×T×(heads·width)`` → ``B×heads×T×width`` (token-sized tensors only).

    Every width given to a reshape in this module is a Python int taken from a weight's shape, so
    the exported graph has static feature sizes; OpenVINO 2026.4's CPU plugin fails to compile a
    matrix product by a constant whose input width is left dynamic (``view(…, -1)``): seen in bf16
    on a Zen 4 (AVX-512) CPU, "data.size() == OC" in its post-op composer."""
    batch, tokens, _ = x.shape
    return x.view(batch, tokens, heads, width).transpose(1, 2)


def token_to_image(attention: nn.Module, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """SAM ``Attention(q=queries, k=keys, v=values)`` with ``B×T×E`` token queries and ``B×N×E``
    image keys/values, without projecting the ``N`` image positions."""
    heads = attention.num_heads
    batch, tokens, _ = queries.shape
    width = attention.q_proj.out_features // heads
    q = _split_heads(attention.q_proj(queries), heads, width)  # B×H×T×d
    key_weight, _ = _head_weights(attention.k_proj, heads)  # H×d×E; its bias cancels in the softmax
    key_dim, value_dim = attention.k_proj.in_features, attention.v_proj.in_features
    folded = (q @ key_weight).reshape(batch, heads * tokens, key_dim)  # B×HT×E
    weights = (folded @ keys.transpose(1, 2) / math.sqrt(width)).softmax(dim=-1)  # B×HT×N
    pooled = (weights @ values).view(batch, heads, tokens, value_dim)  # B×H×T×E
    value_weight, value_bias = _head_weights(attention.v_proj, heads)
    heads_out = pooled @ value_weight.transpose(1, 2) + value_bias[:, None, :]  # B×H×T×d
    return attention.out_proj(heads_out.transpose(1, 2).reshape(batch, tokens, heads * width))


def image_to_token(attention: nn.Module, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """SAM ``Attention(q=queries, k=keys, v=values)`` with ``B×N×E`` image queries and ``B×T×E``
    token keys/values, without projecting the ``N`` image positions."""
    heads = attention.num_heads
    batch, tokens, _ = keys.shape
    width = attention.k_proj.out_features // heads
    k = _split_heads(attention.k_proj(keys), heads, width)  # B×H×T×d
    v = _split_heads(attention.v_proj(values), heads, width)
    query_weight, query_bias = _head_weights(attention.q_proj, heads)  # H×d×E, H×d
    folded = (k @ query_weight).reshape(batch, heads * tokens, attention.q_proj.in_features)  # B×HT×E
    offset = (k * query_bias[:, None, :]).sum(dim=-1).reshape(batch, 1, heads * tokens)
    logits = (queries @ folded.transpose(1, 2) + offset) / math.sqrt(width)  # B×N×HT
    positions = queries.shape[1]
    weights = logits.view(batch, positions, heads, tokens).softmax(dim=-1)
    out_weight = attention.out_proj.weight.view(-1, heads, width).permute(1, 2, 0)  # H×d×E
    folded_values = (v @ out_weight).reshape(batch, heads * tokens, attention.out_proj.out_features)  # B×HT×E
    return weights.view(batch, positions, heads * tokens) @ folded_values + attention.out_proj.bias


def _transposed_conv_weight(conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A 2×2 stride-2 transposed convolution's weight as ``in × (row, col, out)``."""
    if tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2) or tuple(conv.padding) != (0, 0):
        raise ValueError("the factorised decoder needs 2×2 stride-2 transposed convolutions")
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)


class FactorisedMaskDecoder(nn.Module):
    """``MaskDecoder.predict_masks`` of ``decoder`` (all ``1 + num_multimask`` masks), same
    inputs and outputs as the direct graph, computed as the module docstring describes."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        upscaling = list(decoder.output_upscaling)
        if len(upscaling) != 5 or not isinstance(upscaling[0], nn.ConvTranspose2d):
            raise ValueError("the factorised decoder needs SAM's output upscaling")

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
        decoder, transformer = self.decoder, self.decoder.transformer
        height, width = image_embeddings.shape[-2:]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        image = (image_embeddings + dense_prompt_embeddings).flatten(2).transpose(1, 2)  # B×N×E
        image_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in transformer.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + tokens
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            keyed = image + image_pe
            queries = layer.norm2(
                queries + token_to_image(layer.cross_attn_token_to_image, queries + tokens, keyed, image)
            )
            queries = layer.norm3(queries + layer.mlp(queries))
            image = layer.norm4(
                image + image_to_token(layer.cross_attn_image_to_token, keyed, queries + tokens, queries)
            )
        final_attention = transformer.final_attn_token_to_image
        final = token_to_image(final_attention, queries + tokens, image + image_pe, image)
        queries = transformer.norm_final_attn(queries + final)

        batch = image.shape[0]  # one per prompt set: SAM repeats the image for each
        first, norm, first_act, second, second_act = decoder.output_upscaling
        mid = first.weight.shape[1]
        upscaled = image @ _transposed_conv_weight(first) + first.bias.repeat(4)  # B×N×(2·2·mid)
        upscaled = upscaled.view(batch, height * width * 4, mid)
        upscaled = first_act(F.layer_norm(upscaled, (mid,), norm.weight, norm.bias, norm.eps))
        out = second.weight.shape[1]
        upscaled = second_act(upscaled @ _transposed_conv_weight(second) + second.bias.repeat(4))
        upscaled = upscaled.view(batch, height * width * 16, out)  # positions (i, j, a, b, c, d)

        mask_tokens = queries[:, 1 : 1 + decoder.num_mask_tokens]
        hyper = torch.stack(
            [mlp(mask_tokens[:, index]) for index, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )  # B×M×out
        masks = upscaled @ hyper.transpose(1, 2)  # B×(N·16)×M
        count = hyper.shape[1]
        # Output pixel (4i + 2a + c, 4j + 2b + d) of embedding position (i, j), sub-pixels a, b
        # of the first upscaling and c, d of the second.
        masks = masks.view(batch, height, width, 2, 2, 2, 2, count).permute(0, 7, 1, 3, 5, 2, 4, 6)
        masks = masks.reshape(batch, count, 4 * height, 4 * width)
        return masks, decoder.iou_prediction_head(queries[:, 0])
