"""The evaluation split: evaluation identities can never reach training, whatever --data is given."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from petal_runtime.errors import PetalError
from petal_train import splits


def test_the_evaluation_part_has_400_identities_and_always_the_lfw10_ones():
    names = splits.evaluation_identities()
    assert len(names) == len(set(names)) == splits.EVAL_IDENTITIES >= 300
    assert set(splits.LFW10) <= set(names)


def test_names_are_compared_without_case_accents_or_separators():
    assert splits.overlap(["george w bush", "Tony-Blair", "José_Someone", "Jacques_Chirac"]) == \
        ["Jacques_Chirac", "Tony-Blair", "george w bush"]
    assert splits.fold_name("  Ana_María  López ") == "ana_maria_lopez"


def test_the_committed_list_is_what_the_rule_gives_on_the_whole_lfw(shared_faces):
    root = shared_faces / "lfw"
    if not root.is_dir():
        pytest.skip(f"the whole LFW is not at {root}")
    counts = {d.name: sum(1 for _ in d.glob("*.jpg")) for d in root.iterdir() if d.is_dir()}
    assert list(splits.evaluation_identities()) == splits.choose_evaluation_identities(counts)
    assert all(counts[name] >= 2 for name in splits.evaluation_identities())
    assert list(splits.development_identities()) == splits.choose_development_identities(counts)
    assert all(counts[name] >= 2 for name in splits.development_identities())


def test_the_development_part_is_200_identities_apart_from_the_evaluation_ones():
    development = splits.development_identities()
    assert len(development) == len(set(development)) == splits.DEV_IDENTITIES
    assert not splits.overlap(development), "release choices are never made on evaluation identities"


@pytest.fixture
def folder_with_an_evaluation_identity(shared_faces, tmp_path):
    """Identity folders of real LFW photos: one evaluation identity under another spelling, two others."""
    from tests.conftest import require_models

    require_models()
    root = tmp_path / "people"
    sources = {"george w bush": shared_faces / "lfw10" / "George_W_Bush",
               "Visitor_One": shared_faces / "lfw10" / "Tony_Blair",  # a name outside the evaluation list
               "Visitor_Two": shared_faces / "lfw10" / "Hugo_Chavez"}
    for name, source in sources.items():
        (root / name).mkdir(parents=True)
        for image in sorted(source.glob("*.jpg"))[:3]:
            shutil.copy(image, root / name / image.name)
    return root


def test_training_on_a_folder_that_holds_an_evaluation_identity_is_refused_naming_it(
        folder_with_an_evaluation_identity):
    from petal_train.data import load_training_data

    with pytest.raises(PetalError, match=r"1 evaluation identity \(george w bush\).*--drop-eval-identities"):
        load_training_data(folder_with_an_evaluation_identity)


def test_dropping_evaluation_identities_trains_on_the_rest_only(folder_with_an_evaluation_identity):
    from petal_train.data import load_training_data

    data = load_training_data(folder_with_an_evaluation_identity, drop_eval_identities=True)
    assert data.names == ["Visitor_One", "Visitor_Two"]
    assert data.evaluation_dropped == ["george w bush"]
    assert sorted(np.unique(data.labels)) == [0, 1] and len(data) == 6


def test_dropping_development_identities_keeps_them_out_of_training_as_a_holdout(shared_faces, tmp_path):
    from petal_train.data import load_training_data
    from tests.conftest import require_models

    require_models()
    dev_name = splits.development_identities()[0]
    source = shared_faces / "lfw" / dev_name
    if not source.is_dir():
        pytest.skip(f"the whole LFW is not at {source.parent}")
    root = tmp_path / "people"
    for name, folder in {dev_name: source, "Visitor_One": shared_faces / "lfw10" / "Tony_Blair"}.items():
        (root / name).mkdir(parents=True)
        for image in sorted(folder.glob("*.jpg"))[:2]:
            shutil.copy(image, root / name / image.name)
    assert load_training_data(root).names == sorted([dev_name, "Visitor_One"])
    data = load_training_data(root, drop_dev_identities=True)
    assert data.names == ["Visitor_One"] and data.holdout == [dev_name] and len(data) == 2


def test_fit_refuses_evaluation_identities_before_any_training(folder_with_an_evaluation_identity, tmp_path):
    from petal_train.fit import FitConfig, fit

    with pytest.raises(PetalError, match="george w bush"):
        fit(FitConfig(data=str(folder_with_an_evaluation_identity), out=str(tmp_path / "run"), progress=False))
    assert not (tmp_path / "run" / "ckpt.pt").exists()
