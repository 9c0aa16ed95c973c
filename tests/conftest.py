import os
import warnings

import pytest

# tests never write into the user's cache
os.environ.setdefault("FCCLIP_TEXT_CACHE", "0")


@pytest.fixture(scope="session")
def tiny_model():
    from fcclip import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model("fcclip-tiny", weights="random", device="cpu")


@pytest.fixture(scope="session")
def tiny_predictor(tiny_model):
    from fcclip import Predictor

    return Predictor(tiny_model, "cat; dog, puppy; grass [stuff]; sky [stuff]")
