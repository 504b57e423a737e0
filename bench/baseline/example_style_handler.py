"""The baseline: a handler written the way TorchServe's own MNIST example is.

An eager model rebuilt by BaseHandler from a model file and a state_dict, torchvision
transforms applied one image at a time, no batching (the archive sets batchSize 1) and
TorchServe's default thread settings. It serves the same trained model as the kit's handlers,
so the load benchmark compares serving designs, not models.
"""

import io
import json
import os

import torch
from PIL import Image
from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler


class ExampleStyleHandler(BaseHandler):
    def initialize(self, context):
        super().initialize(context)
        with open(os.path.join(context.system_properties["model_dir"], "spec.json")) as f:
            spec = json.load(f)
        self.class_names = spec["class_names"]
        self.image_processing = transforms.Compose([transforms.ToTensor(),
                                                    transforms.Normalize(spec["mean"], spec["std"])])

    def preprocess(self, data):
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            image = Image.open(io.BytesIO(image)).convert("L")
            images.append(self.image_processing(image))
        return torch.stack(images).to(self.device)

    def postprocess(self, data):
        probabilities = torch.softmax(data, dim=1)
        return [{name: float(p) for name, p in zip(self.class_names, row)} for row in probabilities]
