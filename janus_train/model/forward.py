"""The training forward: one LLM pass over a micro-batch that mixes text, understanding and
generation samples, returning per-task summed cross-entropy and supervised-token counts.

The batch dict it consumes (keys, shapes, padding) is defined in ``janus_train/batch.py``,
with the one collate that produces it and ``check_batch``.

Codes are embedded only by ``generation_aligner(generation_embeddings(.))`` and predicted only
by ``generation_head``; text only by the text embedding table and ``lm_head`` (spec §7).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from janus_train.batch import CODE_FROM_PIXELS, IGNORE, TASK_IDS, TASKS
from janus_train.compat import get_attn_implementation
from janus_train.model.attention import VARLEN_IMPLS
from janus_train.model.loss import HeadLoss
from janus_train.model.vq_codes import vq_codes


@dataclass
class BatchIndex:
    """Where things are in a micro-batch, computed on the host before the batch is copied to
    the device (:func:`index_batch`), so that the forward sizes nothing from device values:
    no host sync inside a micro-step. Flat indices into the (B*T) token positions, long."""

    code_slots: torch.Tensor
    """(n_code,) positions holding an image code (given or from pixels), row-major."""
    fill_slots: torch.Tensor
    """(n_fill,) positions whose code comes from ``gen_pixel_values`` (``CODE_FROM_PIXELS``)."""
    image_slots: torch.Tensor
    """(n_img_tok,) ``<image_placeholder>`` positions (understanding features go there)."""
    text_pos: torch.Tensor
    """(n_text,) positions t whose next token t+1 is a supervised text label."""
    code_pos: torch.Tensor
    """(n_gen,) positions t whose next token t+1 is an image code."""
    n_tokens: torch.Tensor
    """(3,) long supervised tokens per task (``TASKS`` order)."""
    cu_seqlens: torch.Tensor | None = None
    """(n_seq + 1,) int32 starts of the sequences of the flattened rows (``position_ids`` 0:
    each sample, and each right-padding token on its own); None without ``position_ids``."""
    max_seqlen: int = 0

    def _map(self, fn) -> BatchIndex:
        kw = {
            f.name: fn(getattr(self, f.name)) if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }  # fmt: skip
        return BatchIndex(**kw)

    def to(self, device, non_blocking: bool = False) -> BatchIndex:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> BatchIndex:
        return self._map(lambda t: t.pin_memory())

    def varlen_kwargs(self) -> dict:
        """Flash-style varlen arguments: all four, or HF falls back to plain causal attention
        over the whole row (samples would see each other)."""
        if self.cu_seqlens is None:
            return {}
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }


def _flat(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().view(-1)


def index_batch(batch: dict[str, torch.Tensor], image_token_id: int) -> BatchIndex:
    """The :class:`BatchIndex` of ``batch`` (computed on the CPU; a device batch is copied
    back first, one sync: the trainer indexes its host batches before the copy)."""
    input_ids = batch["input_ids"].cpu()
    labels = batch["labels"].cpu()
    codes = batch["image_codes"].cpu()
    task = batch["task_ids"].cpu()
    B, T = input_ids.shape
    code_mask = (codes >= 0) | (codes == CODE_FROM_PIXELS)
    nxt = torch.zeros_like(code_mask)  # position t predicts t + 1 of its row
    nxt[:, :-1] = labels[:, 1:] != IGNORE
    text_pos = _flat(nxt)
    nxt = torch.zeros_like(code_mask)
    nxt[:, :-1] = code_mask[:, 1:]
    code_pos = _flat(nxt)
    tids = task.reshape(-1)[text_pos + 1].clamp(min=0)
    n_tokens = torch.bincount(tids, minlength=len(TASKS))[: len(TASKS)].clone()
    n_tokens[TASK_IDS["gen"]] += code_pos.numel()
    cu, max_len = None, 0
    position_ids = batch.get("position_ids")
    if position_ids is not None:
        # Right padding only: pads come after every real token, so HF's block-causal mask from
        # the position restarts (built when attention_mask is None) and the cu_seqlens below
        # keep packed samples apart and never let a real token see a pad.
        am = batch["attention_mask"].cpu()
        if bool((am[:, 1:] > am[:, :-1]).any()):
            raise ValueError("batch with position_ids must be right-padded")
        flat = position_ids.cpu().reshape(-1)
        starts = (flat == 0).nonzero().view(-1).to(torch.int32)
        if starts.numel() == 0 or int(starts[0]) != 0:
            raise ValueError("packed rows must start each sample at position_ids 0")
        cu = torch.cat([starts, starts.new_tensor([flat.numel()])])
        max_len = int(cu.diff().max())
    return BatchIndex(
        code_slots=_flat(code_mask),
        fill_slots=_flat(codes == CODE_FROM_PIXELS),
        image_slots=_flat(input_ids == image_token_id),
        text_pos=text_pos,
        code_pos=code_pos,
        n_tokens=n_tokens,
        cu_seqlens=cu,
        max_seqlen=max_len,
    )


def with_index(batch: dict, janus) -> dict:
    """``batch`` plus its ``"index"`` (:func:`index_batch`) for ``janus``; call on the host
    batch, before the copy to the device."""
    return {**batch, "index": index_batch(batch, janus.config.image_token_id)}


class JanusTrainModel(nn.Module):
    """Wraps a ``JanusForConditionalGeneration`` with the training forward.

    ``call_all_modules``: every encoder/adaptor/head runs every step, on a dummy input attached
    to the loss with weight 0 when the micro-batch lacks that task, so ZeRO-3's parameter
    gathers happen on every rank in the same order (spec §7) and every trainable parameter
    gets a gradient.
    ``params_partitioned`` (ZeRO-3): how the heads read their weights (``HeadLoss``), and an
    LLM input that always needs a gradient (the same backward gathers on every rank). The
    frozen VQ needs no dummy encode: the trainer holds it outside the engine
    (``vq_codes.detach_vq``), so it is never partitioned and has no collective to keep in step.
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
        ``encode``, in float32 whatever the training precision."""
        return vq_codes(self.janus.model.vqmodel, gen_pixel_values)

    def _fill_codes(self, batch, ix: BatchIndex) -> torch.Tensor:
        """(n_code,) the micro-batch's image codes in ``ix.code_slots`` order, those marked
        ``CODE_FROM_PIXELS`` encoded from ``gen_pixel_values``."""
        flat = batch["image_codes"].reshape(-1)
        gen_px = batch.get("gen_pixel_values")
        n_need = ix.fill_slots.numel()
        if gen_px is None or gen_px.shape[0] == 0:
            if n_need:
                raise ValueError(f"batch has {n_need} image-code slots but no gen_pixel_values")
            return flat.index_select(0, ix.code_slots)
        enc = self.encode_images(gen_px).reshape(-1)
        if enc.numel() != n_need:
            raise ValueError(
                f"batch has {n_need} image-code slots but gen_pixel_values encode to {enc.numel()}"
            )
        flat = flat.index_copy(0, ix.fill_slots, enc.to(flat.dtype))
        return flat.index_select(0, ix.code_slots)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns ``{"loss_sum": (3,) float32, "n_tokens": (3,) long}`` in ``TASKS`` order:
        summed CE and supervised-token counts per task (text, und, gen).

        Sizes come from ``batch["index"]`` (:func:`with_index`, computed on the host) or, when
        absent, from :func:`index_batch` here; nothing else reads a device value on the host."""
        inner = self.janus.model
        input_ids = batch["input_ids"]
        ix = batch.get("index")
        if ix is None:
            ix = index_batch(batch, self.janus.config.image_token_id).to(input_ids.device)
        B, T = input_ids.shape
        codes = self._fill_codes(batch, ix)  # (n_code,)
        inputs_embeds, zero = self._embed_inputs(batch, ix, codes)

        attention_mask = batch["attention_mask"]
        position_ids = batch.get("position_ids")
        if position_ids is not None:
            attention_mask = None  # packed rows: kept apart by position restarts (BatchIndex)
        if self.params_partitioned and torch.is_grad_enabled() and not inputs_embeds.requires_grad:
            # ZeRO-3 gathers a layer's weights in backward only where autograd reaches it. With a
            # frozen embedding table (LoRA on the LLM) and no trainable image features in this
            # micro-batch, the LLM input needs a gradient so that every rank runs the same
            # backward (the same gathers) as a rank whose micro-batch has images.
            inputs_embeds = inputs_embeds.detach().requires_grad_()
        impl = get_attn_implementation(inner.language_model.config)
        out = inner.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **(ix.varlen_kwargs() if impl in VARLEN_IMPLS else {}),
        )
        hidden = out.last_hidden_state.reshape(B * T, -1)  # position t predicts target at t+1
        loss_sum, zero = self._head_losses(batch, ix, codes, hidden, zero)
        loss_sum = loss_sum + zero.float()
        return {"loss_sum": loss_sum, "n_tokens": ix.n_tokens}

    def _embed_inputs(
        self, batch: dict[str, torch.Tensor], ix: BatchIndex, codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d) LLM input: text embeddings, with the aligner's image features at
        ``ix.image_slots`` and the generation embeddings of ``codes`` at ``ix.code_slots``; and
        the scalar that carries the dummy calls (weight 0) of the modules this micro-batch lacks."""
        janus = self.janus
        inner = janus.model
        input_ids = batch["input_ids"]
        B, T = input_ids.shape
        embed = inner.language_model.get_input_embeddings()
        pad_id = janus.config.text_config.pad_token_id or 0
        text_ids = input_ids.reshape(-1).index_fill(0, ix.code_slots, pad_id).view(B, T)
        inputs_embeds = embed(text_ids)  # (B, T, d)
        d = inputs_embeds.shape[-1]

        def put(x, slots, values):  # out of place and not a view (a compiled layer's input)
            return x.index_put((slots // T, slots % T), values.reshape(-1, d).to(x.dtype))

        zero = inputs_embeds.new_zeros(())  # dummy terms attach here with weight 0

        pixel_values = batch.get("pixel_values")
        if pixel_values is not None and pixel_values.shape[0] > 0:
            feats = inner.get_image_features(pixel_values.to(inputs_embeds.dtype)).pooler_output
            n_img = ix.image_slots.numel()
            if n_img * d != feats.numel():
                raise ValueError(
                    f"batch has {n_img} <image_placeholder> tokens but "
                    f"{pixel_values.shape[0]} images x {feats.shape[1]} features"
                )
            inputs_embeds = put(inputs_embeds, ix.image_slots, feats)
        elif self.call_all_modules:
            size = janus.config.vision_config.image_size
            dummy = inputs_embeds.new_zeros(1, 3, size, size)
            zero = zero + 0.0 * inner.get_image_features(dummy).pooler_output.sum()

        if codes.numel():
            gen_embeds = janus.prepare_embeddings_for_image_generation(codes)
            inputs_embeds = put(inputs_embeds, ix.code_slots, gen_embeds)
        elif self.call_all_modules:
            dummy_code = torch.zeros(1, dtype=torch.long, device=input_ids.device)
            zero = zero + 0.0 * janus.prepare_embeddings_for_image_generation(dummy_code).sum()
        return inputs_embeds, zero

    def _head_losses(
        self,
        batch: dict[str, torch.Tensor],
        ix: BatchIndex,
        codes: torch.Tensor,
        hidden: torch.Tensor,
        zero: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(3,) float32 summed CE per task from the LLM's ``hidden`` (B*T, d), and ``zero`` with
        the dummy head calls of the tasks this micro-batch lacks added.

        Heads run only on supervised positions: avoids (B, T, vocab) logits; ``head_loss`` can
        also avoid (supervised tokens, vocab) ones. One head call per micro-step, every task's
        tokens together."""
        janus = self.janus
        loss_sum = torch.zeros(len(TASKS), dtype=torch.float32, device=hidden.device)
        if ix.text_pos.numel():
            nxt = ix.text_pos + 1
            tids = batch["task_ids"].reshape(-1).index_select(0, nxt).clamp(min=0)
            loss_sum = loss_sum + self.head_loss.group_sums(
                hidden.index_select(0, ix.text_pos),
                janus.lm_head,
                batch["labels"].reshape(-1).index_select(0, nxt),
                tids,
                len(TASKS),
            )
        elif self.call_all_modules:
            zero = zero + 0.0 * janus.lm_head(hidden[:1]).sum()

        head = janus.model.generation_head
        if ix.code_pos.numel():
            # HF's JanusVQVAEHead.forward split before its last Linear, which meets the CE;
            # the targets: the codes at t+1, i.e. ``codes`` at the slots that follow a code_pos
            x = head.activation_fn(head.proj_out(hidden.index_select(0, ix.code_pos)))
            target = self._codes_at(ix, codes, ix.code_pos + 1)
            ce = self.head_loss.group_sums(x, head.vision_head, target, torch.zeros_like(target), 1)
            loss_sum = loss_sum + F.pad(ce, (TASK_IDS["gen"], len(TASKS) - 1 - TASK_IDS["gen"]))
        elif self.call_all_modules:  # the same module calls as above (ZeRO-3's trace)
            dummy = head.vision_head(head.activation_fn(head.proj_out(hidden[:1])))
            zero = zero + 0.0 * dummy.sum()
        return loss_sum, zero

    @staticmethod
    def _codes_at(ix: BatchIndex, codes: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``codes`` (in ``ix.code_slots`` order) at ``slots``, each of which is a code slot:
        both are sorted, so ``searchsorted`` finds each one's rank without a host sync."""
        return codes.index_select(0, torch.searchsorted(ix.code_slots, slots))
