"""Decoding with the compact collaborative cache in KerasHub's `generate()`.

KerasHub's GPT-2, OPT and BART tasks keep one cache tensor of shape
`(batch, num_layers, 2, max_length, num_heads, head_dim)`: a converted model
decoding through it would store a full-size key slot per token. The mixins
here replace that cache by a tuple with one compact cache per decoder layer,
`(batch, 1, max_length, cache_width)` (see
`CachedCollaborativeMultiHeadAttention`), so that each layer stores exactly
its shared key, content logits and values, whatever its own D̃. Samplers
carry any tuple of tensors (`keras.tree`), so `generate()`, every sampler
and `stop_token_ids` work unchanged.

Each mixin overrides the task's cache hooks (`_build_cache` and
`call_with_cache`, or BART's `_initialize_cache` and
`call_decoder_with_cache`), re-running the task's own embedding and output
layers around the per-layer caches. A model whose decoder attention is not
all collaborative falls back to KerasHub's own cache.
"""

from keras import ops

from keras_collab.layers import CachedCollaborativeMultiHeadAttention


def _self_attention_layers(decoder_layers):
    """The self-attention layers of KerasHub `TransformerDecoder`s, or
    `None` unless every one of them takes the compact cache."""
    layers = [layer._self_attention_layer for layer in decoder_layers]
    if all(
        isinstance(layer, CachedCollaborativeMultiHeadAttention)
        for layer in layers
    ):
        return layers
    return None


def _cross_attention_layers(decoder_layers):
    layers = [layer._cross_attention_layer for layer in decoder_layers]
    if all(
        isinstance(layer, CachedCollaborativeMultiHeadAttention)
        for layer in layers
    ):
        return layers
    return None


def _empty_caches(layers, batch_size, max_length, dtype):
    return tuple(
        layer.empty_cache(batch_size, max_length, dtype) for layer in layers
    )


def is_compact(cache):
    """Whether `cache` is the per-layer tuple of compact caches."""
    return isinstance(cache, (tuple, list))


def cache_numbers_per_token(cache):
    """Numbers the cache keeps per sequence and token, over all layers."""
    return sum(int(layer_cache.shape[-1]) for layer_cache in cache)


def _gpt2_embeddings(backbone, token_ids, start_index):
    tokens = backbone.token_embedding(token_ids)
    positions = backbone.position_embedding(tokens, start_index=start_index)
    x = backbone.embeddings_add((tokens, positions))
    return backbone.embeddings_dropout(x)


def _opt_embeddings(backbone, token_ids, start_index):
    return backbone.embeddings(token_ids, start_index=start_index)


# The embedding step of each decoder-only architecture's `call_with_cache`;
# both end with `backbone.layer_norm` and the tied output embedding.
EMBEDDINGS = {
    "GPT2Backbone": _gpt2_embeddings,
    "OPTBackbone": _opt_embeddings,
}


class CompactCacheCausalLM:
    """Mixin for the collaborative twins of GPT-2 and OPT causal LMs."""

    def _embeddings(self, token_ids, start_index):
        for cls in type(self.backbone).__mro__:
            if cls.__name__ in EMBEDDINGS:
                return EMBEDDINGS[cls.__name__](
                    self.backbone, token_ids, start_index
                )
        raise ValueError(
            f"No compact-cache decoding for {type(self.backbone).__name__}."
        )

    def _build_cache(self, token_ids):
        layers = _self_attention_layers(self.backbone.transformer_layers)
        if layers is None:
            return super()._build_cache(token_ids)
        batch_size, max_length = ops.shape(token_ids)[:2]
        cache = _empty_caches(
            layers, batch_size, max_length, self.compute_dtype
        )
        _, hidden_states, cache = self.call_with_cache(token_ids, cache, 0)
        return hidden_states, cache

    def call_with_cache(self, token_ids, cache, cache_update_index):
        if not is_compact(cache):
            return super().call_with_cache(token_ids, cache, cache_update_index)
        x = self._embeddings(token_ids, cache_update_index)
        caches = []
        for layer, layer_cache in zip(self.backbone.transformer_layers, cache):
            x, layer_cache = layer(
                x,
                self_attention_cache=layer_cache,
                self_attention_cache_update_index=cache_update_index,
            )
            caches.append(layer_cache)
        hidden_states = x = self.backbone.layer_norm(x)
        logits = self.backbone.token_embedding(x, reverse=True)
        return logits, hidden_states, tuple(caches)


class CompactCacheSeq2SeqLM:
    """Mixin for the collaborative twin of BART's `Seq2SeqLM`: compact
    caches for the decoder's self-attention, and for its cross-attention,
    whose shared keys, content logits and values of the encoder output are
    computed once."""

    def _initialize_cache(self, encoder_token_ids, decoder_token_ids):
        decoder_layers = self.backbone.decoder_transformer_layers
        self_layers = _self_attention_layers(decoder_layers)
        cross_layers = _cross_attention_layers(decoder_layers)
        if self_layers is None or cross_layers is None:
            return super()._initialize_cache(
                encoder_token_ids, decoder_token_ids
            )
        batch_size, encoder_length = ops.shape(encoder_token_ids)[:2]
        decoder_length = ops.shape(decoder_token_ids)[1]
        dtype = self.compute_dtype
        return (
            _empty_caches(self_layers, batch_size, decoder_length, dtype),
            _empty_caches(cross_layers, batch_size, encoder_length, dtype),
        )

    def call_decoder_with_cache(
        self,
        encoder_hidden_states,
        encoder_padding_mask,
        decoder_token_ids,
        self_attention_cache=None,
        self_attention_cache_update_index=None,
        cross_attention_cache=None,
        cross_attention_cache_update_index=None,
    ):
        if not is_compact(self_attention_cache):
            return super().call_decoder_with_cache(
                encoder_hidden_states,
                encoder_padding_mask,
                decoder_token_ids,
                self_attention_cache=self_attention_cache,
                self_attention_cache_update_index=(
                    self_attention_cache_update_index
                ),
                cross_attention_cache=cross_attention_cache,
                cross_attention_cache_update_index=(
                    cross_attention_cache_update_index
                ),
            )
        backbone = self.backbone
        tokens = backbone.token_embedding(decoder_token_ids)
        positions = backbone.decoder_position_embedding(
            tokens, start_index=self_attention_cache_update_index
        )
        x = backbone.decoder_embeddings_add((tokens, positions))
        x = backbone.decoder_embeddings_layer_norm(x)
        x = backbone.decoder_embeddings_dropout(x)
        self_caches, cross_caches = [], []
        for layer, self_cache, cross_cache in zip(
            backbone.decoder_transformer_layers,
            self_attention_cache,
            cross_attention_cache,
        ):
            x, self_cache, cross_cache = layer(
                decoder_sequence=x,
                encoder_sequence=encoder_hidden_states,
                encoder_padding_mask=encoder_padding_mask,
                self_attention_cache=self_cache,
                self_attention_cache_update_index=(
                    self_attention_cache_update_index
                ),
                cross_attention_cache=cross_cache,
                cross_attention_cache_update_index=(
                    cross_attention_cache_update_index
                ),
            )
            self_caches.append(self_cache)
            cross_caches.append(cross_cache)
        logits = backbone.token_embedding(x, reverse=True)
        return logits, x, tuple(self_caches), tuple(cross_caches)


def decoding_mixin(task_cls):
    """The compact-cache mixin for a KerasHub task class, or `None`."""
    names = {cls.__name__ for cls in task_cls.__mro__}
    if "BartSeq2SeqLM" in names:
        return CompactCacheSeq2SeqLM
    backbone_cls = getattr(task_cls, "backbone_cls", None) or object
    backbone_names = {cls.__name__ for cls in backbone_cls.__mro__}
    if "CausalLM" in names and backbone_names & set(EMBEDDINGS):
        return CompactCacheCausalLM
    return None
