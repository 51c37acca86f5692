"""One measurement of the reference Lite-HRNet (OTX 2.6's LiteHRNetBackbone + FCNHead), run by
the reference's own Python (OTX needs torch 2.14 and its torchvision, not segflow's torch):

    REFERENCE_PYTHON benchmarks/otx_reference.py --model lite_hrnet_s --task train|infer [--threads 2]

Prints one JSON line. train_throughput.py and inference.py start it, alternating with segflow's
side of the same protocol (benchmarks/protocol.py). How to build the environment: README
("Speed against the reference").
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol


def build(name: str, classes: int = 3) -> torch.nn.Module:
    warnings.filterwarnings("ignore")
    from otx.backend.native.models.segmentation.backbones import litehrnet
    from otx.backend.native.models.segmentation.heads.fcn_head import FCNHead

    for cls in vars(litehrnet).values():  # it would fetch ImageNet weights; speed does not need them
        if isinstance(cls, type) and hasattr(cls, "load_pretrained_weights"):
            cls.load_pretrained_weights = lambda self, *args, **kwargs: None

    class Reference(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = litehrnet.LiteHRNetBackbone(name), FCNHead(name, num_classes=classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.head(self.backbone(x))
            return torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return Reference()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", choices=["train", "infer"], required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = build(args.model)
    if args.task == "train":
        value = protocol.train_img_s(net.train(), net.parameters(), size=args.size or 256)
    else:
        value = protocol.infer_ms(net.eval(), size=args.size or 512)
    print(json.dumps({"value": value, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
