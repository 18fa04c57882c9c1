"""The training forward: one LLM pass over a micro-batch that mixes text, understanding and
generation samples, returning per-task summed cross-entropy and supervised-token counts.

The batch dict it consumes (keys, shapes, padding) is defined in ``janus_train/batch.py``,
with the one collate that produces it and ``check_batch``.

Codes are embedded only by ``generation_aligner(generation_embeddings(.))`` and predicted only
by ``generation_head``; text only by the text embedding table and ``lm_head`` (spec §7).
"""

from __future__ import annotations

import torch
from torch import nn

# the batch contract's names, defined once (re-exported here for the model package)
from janus_train.batch import CODE_FROM_PIXELS, IGNORE, TASK_IDS, TASKS  # noqa: F401
from janus_train.model.loss import HeadLoss
from janus_train.model.vq_codes import vq_codes

# Attention implementations that keep packed samples apart, and how (see ``varlen_kwargs``):
# the mask-based ones get HF's block-causal mask derived from the position_ids restarts (a
# (B, 1, T, T) mask for eager/sdpa: the CPU path; a sparse BlockMask for flex_attention); the
# flash ones get explicit cu_seqlens (varlen kernels, no mask, any number of rows).
MASK_PACKED_IMPLS = ("eager", "sdpa", "flex_attention")
VARLEN_IMPLS = ("flash_attention_2", "flash_attention_3")
PACKED_SAFE_IMPLS = MASK_PACKED_IMPLS + VARLEN_IMPLS


def check_attn_implementation(impl: str | None, field: str = "model.attn_implementation") -> None:
    """Refuse an attention implementation that would let packed samples see each other."""
    if impl not in PACKED_SAFE_IMPLS:
        raise ValueError(
            f"{field}={impl!r} cannot keep packed samples apart (samples would attend to each "
            f"other): use one of {', '.join(PACKED_SAFE_IMPLS)}"
        )


def varlen_kwargs(position_ids: torch.Tensor | None, impl: str | None) -> dict:
    """Flash attention's varlen arguments for a batch of packed rows, from ``position_ids``.

    HF infers sample boundaries from ``position_ids`` only for a single row; here the (B, T)
    rows are flattened into one token stream whose sequences start where ``position_ids`` is 0
    (each sample, and each right-padding token on its own), so several packed rows stay apart
    too. Empty for non-flash implementations (they get HF's packed mask instead)."""
    if position_ids is None or impl not in VARLEN_IMPLS:
        return {}
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1).to(torch.int32)
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed rows must start each sample at position_ids 0")
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])])
    max_len = int(cu.diff().max())
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_len,
        "max_length_k": max_len,
    }


class JanusTrainModel(nn.Module):
    """Wraps a ``JanusForConditionalGeneration`` with the training forward.

    ``call_all_modules``: every encoder/adaptor/head runs every step, on a dummy input attached
    to the loss with weight 0 when the micro-batch lacks that task, so ZeRO-3's parameter
    gathers happen on every rank in the same order (spec §7) and every trainable parameter
    gets a gradient.
    ``params_partitioned`` (ZeRO-3): also run the frozen VQ encoder on a dummy image when the
    micro-batch has nothing to encode. Without partitioning it has no collective to keep in
    step, and with pre-tokenized codes it would be a wasted VQ encode per micro-batch.
    ``head_loss``: how ``lm_head`` and the image head's last Linear meet the cross-entropy
    (chunked, Liger's fused kernel; ``janus_train.model.loss``); default: all logits at once.
    """

    def __init__(
        self,
        janus: nn.Module,
        call_all_modules: bool = True,
        params_partitioned: bool = False,
        head_loss: HeadLoss | None = None,
    ):
        super().__init__()
        self.janus = janus
        self.call_all_modules = call_all_modules
        self.params_partitioned = params_partitioned
        self.head_loss = head_loss or HeadLoss(params_partitioned=params_partitioned)

    @property
    def num_image_tokens(self) -> int:
        return self.janus.config.vision_config.num_image_tokens

    @torch.no_grad()
    def encode_images(self, gen_pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, num_image_tokens) VQ codes with the frozen VQ, assigned
        by cosine as DeepSeek's quantizer does (``janus_train.model.vq_codes``), not by HF's
        ``encode``."""
        return vq_codes(self.janus.model.vqmodel, gen_pixel_values)

    def _fill_codes(self, batch) -> torch.Tensor:
        codes = batch["image_codes"]
        need = codes == CODE_FROM_PIXELS
        gen_px = batch.get("gen_pixel_values")
        n_need = int(need.sum())
        if gen_px is None or gen_px.shape[0] == 0:
            if n_need:
                raise ValueError(f"batch has {n_need} image-code slots but no gen_pixel_values")
            if self.call_all_modules and self.params_partitioned:
                dummy = torch.zeros(
                    1,
                    3,
                    self.janus.config.vision_config.image_size,
                    self.janus.config.vision_config.image_size,
                    device=codes.device,
                )
                self.encode_images(dummy)
            return codes
        enc = self.encode_images(gen_px).reshape(-1)
        if enc.numel() != n_need:
            raise ValueError(
                f"batch has {n_need} image-code slots but gen_pixel_values encode to {enc.numel()}"
            )
        codes = codes.clone()
        codes[need] = enc.to(codes.dtype)
        return codes

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns ``{"loss_sum": (3,) float32, "n_tokens": (3,) long}`` in ``TASKS`` order:
        summed CE and supervised-token counts per task (text, und, gen)."""
        janus = self.janus
        inner = janus.model
        input_ids = batch["input_ids"]
        labels = batch["labels"]
        task = batch["task_ids"]
        codes = self._fill_codes(batch)
        code_pos = codes >= 0

        embed = inner.language_model.get_input_embeddings()
        pad_id = janus.config.text_config.pad_token_id or 0
        text_ids = input_ids.masked_fill(code_pos, pad_id)
        inputs_embeds = embed(text_ids)
        zero = inputs_embeds.new_zeros(())  # dummy terms attach here with weight 0

        pixel_values = batch.get("pixel_values")
        if pixel_values is not None and pixel_values.shape[0] > 0:
            feats = inner.get_image_features(pixel_values.to(inputs_embeds.dtype)).pooler_output
            img_mask = (input_ids == janus.config.image_token_id).unsqueeze(-1)
            if int(img_mask.sum()) * inputs_embeds.shape[-1] != feats.numel():
                raise ValueError(
                    f"batch has {int(img_mask.sum())} <image_placeholder> tokens but "
                    f"{pixel_values.shape[0]} images x {feats.shape[1]} features"
                )
            inputs_embeds = inputs_embeds.masked_scatter(img_mask, feats.to(inputs_embeds.dtype))
        elif self.call_all_modules:
            size = janus.config.vision_config.image_size
            dummy = inputs_embeds.new_zeros(1, 3, size, size)
            zero = zero + 0.0 * inner.get_image_features(dummy).pooler_output.sum()

        if bool(code_pos.any()):
            gen_embeds = janus.prepare_embeddings_for_image_generation(codes[code_pos])
            inputs_embeds = inputs_embeds.masked_scatter(
                code_pos.unsqueeze(-1), gen_embeds.to(inputs_embeds.dtype)
            )
        elif self.call_all_modules:
            dummy_code = torch.zeros(1, dtype=torch.long, device=codes.device)
            zero = zero + 0.0 * janus.prepare_embeddings_for_image_generation(dummy_code).sum()

        attention_mask = batch["attention_mask"]
        position_ids = batch.get("position_ids")
        if position_ids is not None:
            # Right padding only: pads come after every real token, so a block-causal mask built
            # from the position restarts (HF does this when attention_mask is None) keeps packed
            # samples apart and never lets a real token see a pad.
            if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
                raise ValueError("batch with position_ids must be right-padded")
            attention_mask = None
        if self.params_partitioned and torch.is_grad_enabled() and not inputs_embeds.requires_grad:
            # ZeRO-3 gathers a layer's weights in backward only where autograd reaches it. With a
            # frozen embedding table (LoRA on the LLM) and no trainable image features in this
            # micro-batch, the LLM input needs a gradient so that every rank runs the same
            # backward (the same gathers) as a rank whose micro-batch has images.
            inputs_embeds = inputs_embeds.detach().requires_grad_()
        out = inner.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **varlen_kwargs(position_ids, inner.language_model.config._attn_implementation),
        )
        hidden = out.last_hidden_state[:, :-1]  # position t-1 predicts target at t
        t_task = task[:, 1:]

        text_sup = labels[:, 1:] != IGNORE
        img_sup = code_pos[:, 1:]
        loss_sum = torch.zeros(len(TASKS), dtype=torch.float32, device=hidden.device)
        n_tok = torch.zeros(len(TASKS), dtype=torch.long, device=hidden.device)

        # Heads run only on supervised positions: avoids (B, T, vocab) logits; ``head_loss``
        # can also avoid (supervised tokens, vocab) ones.
        if bool(text_sup.any()):
            tids = t_task[text_sup].clamp(min=0)
            loss_sum = loss_sum + self.head_loss.group_sums(
                hidden[text_sup], janus.lm_head, labels[:, 1:][text_sup], tids, len(TASKS)
            )
            n_tok = n_tok.index_add(0, tids, torch.ones_like(tids))
        elif self.call_all_modules:
            zero = zero + 0.0 * janus.lm_head(hidden[:, :1]).sum()

        if bool(img_sup.any()):
            # HF's JanusVQVAEHead.forward split before its last Linear, which meets the CE
            head = inner.generation_head
            x = head.activation_fn(head.proj_out(hidden[img_sup]))
            target = codes[:, 1:][img_sup]
            ce = self.head_loss.group_sums(x, head.vision_head, target, torch.zeros_like(target), 1)
            gen = torch.full((1,), TASK_IDS["gen"], device=hidden.device)
            loss_sum = loss_sum.index_add(0, gen, ce)
            n_tok = n_tok.index_add(0, gen, img_sup.sum().view(1))
        elif self.call_all_modules:  # the same module calls as above (ZeRO-3's trace)
            head = inner.generation_head
            dummy = head.vision_head(head.activation_fn(head.proj_out(hidden[:, :1])))
            zero = zero + 0.0 * dummy.sum()

        loss_sum = loss_sum + zero.float()
        return {"loss_sum": loss_sum, "n_tokens": n_tok}
