"""Tiny models of every family SlimFit must handle, built from config (no hub)."""

import torch
from torch import nn


def hf_bert(layers=2):
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, attn_implementation="eager"))


def hf_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=72, attn_implementation="eager"))


def hf_distilbert(layers=2):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=128, dim=32, n_layers=layers, n_heads=2, hidden_dim=64, max_position_embeddings=64,
        attn_implementation="eager"))


def hf_vit(layers=2):
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, num_labels=3, attn_implementation="eager"))


def timm_vit(layers=2):
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=layers, num_classes=3)


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(self.emb(x)).mean(1))))


def text_batch(model, n=4, seq=12):
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 128, (n, seq), generator=g),
            "labels": torch.randint(0, 2, (n,), generator=g)}


def image_batch(model, n=4):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g),
            "labels": torch.randint(0, 3, (n,), generator=g)}


def loss_fn(name, model, batch):
    if name == "timm-vit":
        return nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])
    if name == "plain":
        return nn.functional.cross_entropy(model(batch["input_ids"] % 16), batch["labels"])
    return model(**batch).loss


# (name, factory, batch factory, expected number of default candidate units)
CASES = [
    # 3 embeddings + emb LN + 2 x (q,k,v,o, attn LN, ffn in/out, out LN) + pooler + classifier
    ("hf-bert", hf_bert, text_batch, 3 + 1 + 2 * 8 + 1 + 1),
    # RoBERTa: same as BERT except its classifier head has dense + out_proj
    ("hf-roberta", hf_roberta, text_batch, 3 + 1 + 2 * 8 + 2),
    # DistilBERT: 2 embeddings + LN, per layer q,k,v,out, sa LN, lin1, lin2, out LN; pre_classifier + classifier
    ("hf-distilbert", hf_distilbert, text_batch, 2 + 1 + 2 * 8 + 2),
    # ViT: cls token, position embeddings, patch conv; per layer q,k,v,o, ffn x2, 2 LNs; final LN; classifier
    ("hf-vit", hf_vit, image_batch, 3 + 2 * 8 + 1 + 1),
    # timm: cls_token, pos_embed, patch conv; per layer qkv(fused), proj, fc1, fc2, 2 norms; norm; head
    ("timm-vit", timm_vit, image_batch, 3 + 2 * 6 + 1 + 1),
    ("plain", PlainNet, text_batch, 4),
]
