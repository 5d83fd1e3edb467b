"""Faces: the data the project reads, dlib's models, visitor photos, and the identity protocol.

- ``data``: identity-grouped face folders (LFW layout), UTKFace, the identity split;
- ``recognition``: dlib's detector, 5-point landmarks and face-recognition ResNet, loaded once; the
  largest face of a photo (``find_face``);
- ``aligned``: aligned crops of data-set photos, cached (the visitor's geometry for every photo);
- ``ingest``: a visitor's photo (or any training photo) -> an aligned face crop, or a sentence
  saying why not;
- ``drawn``: is a face drawn (a cartoon, a drawing)? The rule the ingestion refuses drawings by, and
  its measurement on photos and cartoons (``python -m core.faces.drawn``);
- ``metrics``: the identity numbers of docs (distance, top-k, Frechet distance, bootstrap);
- ``utility``: does a LoRA draw its person (the fine-tune's own score).
"""
