"""The prediction pipeline every prediction route uses (/upload, /api/predict and its fast path, /v2 inference).

    images = Predictor.images(blobs)          # uploaded files: preprocess each (one or two views), stack
    images = Predictor.arrays(array)          # or (n, 28, 28) arrays already in MNIST form (v2's `input`)
    out = predictor.predict(images)           # the model (batched), the mean over each upload's views,
                                              # and each result built by `prediction_json`

`out.results[i]` is the answer of upload i as /api/predict returns it; `out.probabilities` the same
probabilities unrounded (v2 sends them as an FP32 tensor, with the results' digits). A bad image raises
`UploadImageError` (an ImageError naming which file, with preprocess.py's status: 400; 413 over the
request's pixel budget; 415 a format not read), no model yet raises `ModelNotReady`: each route answers them
in its own words (that status, and 503).
"""

from collections import namedtuple

from preprocess import ImageError, PixelBudget, mean_over_views, preprocess_views, stack_views

MODEL_ID_CHARS = 12  # a model is named by the first hex digits of its file's sha256


def model_id(sha256):
    """The short name of a model in answers: the first MODEL_ID_CHARS hex digits of its sha256."""
    return sha256[:MODEL_ID_CHARS]


def prediction_json(probabilities, model_sha256):
    """One prediction as the API returns it (and the upload page shows it).

    probabilities: the model's 10 class probabilities for one image; model_sha256: the sha256 hex of
    the model file. -> {"digit": the most probable class (the first on a tie), "probabilities": the 10
    values as floats rounded to 6 decimals, "model": model_id(model_sha256)}.
    """
    values = [float(p) for p in probabilities]
    digit = max(range(len(values)), key=values.__getitem__)
    return {"digit": digit, "probabilities": [round(p, 6) for p in values], "model": model_id(model_sha256)}


class UploadImageError(ImageError):
    """An upload that is not a usable image: `index` (0-based) of `count` uploads, `reason` from preprocess.py,
    `status` the ImageError's (400; 413 over the request's pixel budget; 415 a format not read).
    str(): the reason, prefixed with "file N: " when there were several uploads (the upload API's wording)."""

    def __init__(self, index, count, reason, status=400):
        super().__init__(f"file {index + 1}: {reason}" if count > 1 else reason)
        self.index, self.count, self.reason, self.status = index, count, reason, status


class ModelNotReady(Exception):
    """No model to predict with yet; str(): why (the holder's last error, or that none is loaded yet)."""


# The model's input for n uploads: float32 (m, 28, 28) images, m >= n, and where each upload's views start
# (None: one view each, m == n).
Images = namedtuple("Images", "images starts")

# What predict() gives: the model that answered, float64 (n, 10) probabilities (each upload's mean over its
# views), and n prediction_json dicts of them.
Predictions = namedtuple("Predictions", "model probabilities results")


class Predictor:
    """The served model (a model.ModelHolder), run through the worker's model.Batcher.

    on_digit(int): called once per prediction with its digit (the mlk_predictions_total counter);
    on_new_model(model): called the first time a model is handed out (the mlk_model_loads_total counter).
    """

    def __init__(self, holder, batcher, on_digit=None, on_new_model=None):
        self.holder = holder
        self.batcher = batcher
        self._on_digit = on_digit
        self._on_new_model = on_new_model
        self._seen = set()

    def model(self):
        """The model to answer with (ModelHolder.get: may load the file, or reload it), None while there is none."""
        model = self.holder.get()
        if model is not None and id(model) not in self._seen:
            self._seen.add(id(model))
            if self._on_new_model is not None:
                self._on_new_model(model)
        return model

    def ready_model(self):
        """The model for readiness answers: once one is served, never the request that loads (and gates) a
        replaced file, so readiness is answered at once throughout a reload."""
        return self.holder.current or self.model()

    def not_ready(self):
        """Why there is no model, in words for any client: none loaded yet, or the file missing or unusable (the
        details, which name the file, are in the log and in not_ready_detail)."""
        return "model not loaded yet" if self.holder.last_error is None else \
            "no model: its file is missing or cannot be loaded (details in the server log)"

    def not_ready_detail(self):
        """Why there is no model, in full: the last load's error (with the file's path), or that none is loaded yet."""
        return self.holder.last_error or "model not loaded yet"

    @staticmethod
    def images(blobs):
        """Encoded image files (bytes) of one request -> Images: each preprocessed (preprocess_views), all
        stacked, their pixels drawn from one preprocess.PixelBudget for the request (413 over it).
        Raises UploadImageError for the first file that is not a usable image."""
        views = []
        budget = PixelBudget()
        for index, blob in enumerate(blobs):
            try:
                views.append(preprocess_views(blob, budget=budget))
            except ImageError as err:
                raise UploadImageError(index, len(blobs), str(err), getattr(err, "status", 400)) from None
        return Images(*stack_views(views))

    @staticmethod
    def arrays(images):
        """float32 (n, 28, 28) in [0, 1], already MNIST-like (bright ink on a dark ground, centred) -> Images."""
        return Images(images, None)

    def predict(self, images):
        """Images -> Predictions. Raises ModelNotReady while no model is loaded."""
        model = self.model()
        if model is None:
            raise ModelNotReady(self.not_ready())
        probabilities = mean_over_views(self.batcher.predict(model, images.images), images.starts)
        results = [prediction_json(row, model.sha256) for row in probabilities]
        if self._on_digit is not None:
            for result in results:
                self._on_digit(result["digit"])
        return Predictions(model, probabilities, results)
