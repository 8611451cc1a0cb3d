"""The peer of bench/gpu_pipeline.py: an explainer service written the way a user would write
one with FastAPI and pytorch-grad-cam (the engine never imports that library; only this bench
does). Same route shape as camserve's: a multipart POST /explain with a ``file``, answering JSON
with the top class and a base64 JPEG overlay at the upload's size.

    PEER_MODEL=/path/to/store/resnet50 PEER_DEVICE=cuda python -m uvicorn fastapi_gradcam:app

The model folder is one of bench/serving.py's (``weights.pt`` of a torchvision architecture, the
manifest's resize/crop/mean/std), so both services run the same weights on the same images.
"""

from __future__ import annotations

import base64
import io
import os
import threading
from pathlib import Path

import numpy as np
import tomllib
import torch
import torchvision
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchvision import transforms

FOLDER = Path(os.environ["PEER_MODEL"])
DEVICE = torch.device(os.environ.get("PEER_DEVICE", "cpu"))
MANIFEST = tomllib.loads((FOLDER / "model.toml").read_text())

model = getattr(torchvision.models, MANIFEST["model"]["architecture"])(num_classes=1000)
model.load_state_dict(torch.load(FOLDER / "weights.pt", map_location="cpu"))
model.eval().to(DEVICE)
PREPROCESS = MANIFEST["preprocess"]
preprocess = transforms.Compose(
    [
        transforms.Resize(PREPROCESS["resize"]),
        transforms.CenterCrop(PREPROCESS["crop"]),
        transforms.ToTensor(),
        transforms.Normalize(PREPROCESS["mean"], PREPROCESS["std"]),
    ]
)
cam = GradCAM(model=model, target_layers=[model.layer4[-1]])
# pytorch-grad-cam's GradCAM keeps the activations and gradients of its last call on the object,
# and FastAPI runs a sync route on a pool of threads: requests at once must take turns on it (a
# shared extractor without this lock fails most requests at c=32).
turn = threading.Lock()
app = FastAPI()


@app.post("/explain")
def explain(file: UploadFile = File(...)) -> dict[str, object]:  # noqa: B008 (FastAPI's idiom)
    image = Image.open(io.BytesIO(file.file.read())).convert("RGB")
    x = preprocess(image).unsqueeze(0).to(DEVICE)
    with turn:
        with torch.no_grad():
            label = int(model(x).argmax(1))
        grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(label)])[0]
    heat = np.asarray(Image.fromarray(np.uint8(grayscale * 255)).resize(image.size)) / 255.0
    overlay = show_cam_on_image(np.asarray(image, dtype=np.float32) / 255, heat, use_rgb=True)
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="JPEG", quality=90)
    return {"class": label, "overlay": base64.b64encode(buffer.getvalue()).decode()}
