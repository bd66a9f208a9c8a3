#!/usr/bin/env python3
"""Write a tiny random Hugging Face folder of each family refformer imports, to try `refformer import-hf` and
`refformer generate` without downloading a checkpoint.

    python scripts/tiny-hf-models.py OUT_DIR      # OUT_DIR/{t5,bart,marian,gpt2,llama,qwen2}

Each folder is what `save_pretrained` writes (config.json, generation_config.json, model.safetensors) plus the
family's tokenizer files, trained here on a few sentences: T5 a sentencepiece `spiece.model`, Marian `source.spm`,
`target.spm` and `vocab.json`, the others a `tokenizer.json` (tokenizers' BPE, saved by PreTrainedTokenizerFast).
The weights are random (seed 0, matrices drawn with std 1/sqrt(fan-in)), so the generated text is random too:
these folders show the commands and the formats, not translations. Needs the `test` extra (torch, transformers,
sentencepiece). OUT_DIR must not exist yet.
"""

import io
import json
import sys
from pathlib import Path

SOURCE = ["Das Haus ist klein und alt.", "Der Hund läuft schnell über die Straße.", "Ich bin ein kleiner Frosch.",
          "Wir gehen heute in die Stadt.", "Guten Morgen, wie geht es dir?"]
TARGET = ["The house is small and old.", "The dog runs quickly across the street.", "I am a small frog.",
          "We are going to town today.", "Good morning, how are you?", "translate English to German: The house."]
CHARACTERS = "".join(sorted(set("".join(SOURCE + TARGET))))


def sentencepiece_model(path, texts, size, **ids):
    """A unigram sentencepiece model trained on texts (every character kept), written to path."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 20 + [CHARACTERS]), model_writer=model, vocab_size=size, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, bos_id=-1, **ids)
    path.write_bytes(model.getvalue())
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def bpe_tokenizer(folder, specials, size=160):
    """A byte-level BPE tokenizer.json with the specials (name -> id, the first ids), saved by transformers'
    PreTrainedTokenizerFast; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    names = [name for name, _ in sorted(specials.items(), key=lambda item: item[1])]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=names, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((SOURCE + TARGET) * 5, trainer)
    roles = {"<s>": "bos_token", "</s>": "eos_token", "<pad>": "pad_token", "<unk>": "unk_token",
             "<|endoftext|>": "eos_token"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{roles[name]: name for name in names})
    fast.save_pretrained(folder)
    return tokenizer.get_vocab_size()


def main(out):
    import torch
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MarianConfig,
        MarianMTModel,
        Qwen2Config,
        Qwen2ForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )
    from transformers.utils import logging

    logging.disable_progress_bar()

    small = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, d_model=32, max_position_embeddings=64)
    causal = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    out.mkdir(parents=True)
    for family in ("t5", "bart", "marian", "gpt2", "llama", "qwen2"):
        folder = out / family
        folder.mkdir()
        torch.manual_seed(0)
        if family == "t5":  # spiece.model: pad 0, eos 1, unk 2 as T5's; import-hf converts it with transformers
            pieces = sentencepiece_model(folder / "spiece.model", SOURCE + TARGET, 60, pad_id=0, eos_id=1, unk_id=2)
            (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 0}))
            model = T5ForConditionalGeneration(T5Config(
                vocab_size=pieces.get_piece_size(), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        elif family == "marian":  # MarianTokenizer's files: </s> 0, <unk> 1, pieces of both sides, <pad> last
            source = sentencepiece_model(folder / "source.spm", SOURCE, 60, eos_id=1, unk_id=0, pad_id=-1)
            target = sentencepiece_model(folder / "target.spm", TARGET, 60, eos_id=1, unk_id=0, pad_id=-1)
            pieces = {spm.id_to_piece(i) for spm in (source, target) for i in range(2, spm.get_piece_size())}
            vocab = {piece: i for i, piece in enumerate(["</s>", "<unk>", *sorted(pieces), "<pad>"])}
            (folder / "vocab.json").write_text(json.dumps(vocab))
            model = MarianMTModel(MarianConfig(vocab_size=len(vocab), pad_token_id=len(vocab) - 1, eos_token_id=0,
                                               decoder_start_token_id=len(vocab) - 1, forced_eos_token_id=0, **small))
        elif family == "bart":
            size = bpe_tokenizer(folder, {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3})
            model = BartForConditionalGeneration(BartConfig(vocab_size=size, pad_token_id=1, bos_token_id=0,
                                                            eos_token_id=2, decoder_start_token_id=2, **small))
        elif family == "gpt2":
            size = bpe_tokenizer(folder, {"<|endoftext|>": 0})
            model = GPT2LMHeadModel(GPT2Config(vocab_size=size, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                               bos_token_id=0, eos_token_id=0))
        else:  # llama: grouped-query attention; qwen2: one KV head, q/k/v biases
            size = bpe_tokenizer(folder, {"<unk>": 0, "<s>": 1, "</s>": 2})
            config_class, model_class = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config,
                                                                                                 Qwen2ForCausalLM)
            model = model_class(config_class(vocab_size=size, num_key_value_heads=2 if family == "llama" else 1,
                                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, **causal))
        with torch.no_grad():  # transformers' initial weights (std 0.02) give one repeated token; 1/sqrt(fan-in)
            for name, tensor in model.named_parameters():
                if tensor.ndim == 2:
                    tensor.normal_(0.0, tensor.shape[-1] ** -0.5)
        model.save_pretrained(folder)
        print(f"{folder}: {type(model).__name__}, {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    if len(sys.argv) != 2 or Path(sys.argv[1]).exists():
        sys.exit("usage: python scripts/tiny-hf-models.py OUT_DIR   (OUT_DIR must not exist yet)")
    main(Path(sys.argv[1]))
