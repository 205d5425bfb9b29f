"""The small classifier, dataset and arguments the transformers-parity tests share."""

import torch
from epochal_core import TrainingArguments
from torch import nn
from torch.utils.data import Dataset


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Points(Dataset):
    def __init__(self, n=16, seed=3):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True,
                per_device_train_batch_size=4, per_device_eval_batch_size=4, save_strategy="no")
    base.update(kw)
    return TrainingArguments(**base)
