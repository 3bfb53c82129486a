"""SliderSpace discovery (sliders_core/sliderspace.py): concept images and their principal directions."""

import numpy as np
import pytest
import torch

from sliders_core.errors import SliderError
from sliders_core.sliderspace import ImageEmbedder, generate_concept_images, principal_directions


def test_principal_directions_are_orthonormal_and_ordered_by_variance():
    embeddings = torch.randn(40, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(3, 0.1, 16)
    directions, explained = principal_directions(embeddings, 5)
    torch.testing.assert_close(directions @ directions.T, torch.eye(5), atol=1e-5, rtol=0)
    assert (explained[:-1] >= explained[1:]).all() and 0 < float(explained.sum()) <= 1


def test_known_directions_are_recovered():
    gen = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(32, 3, generator=gen))  # three orthonormal directions
    coefficients = torch.randn(200, 3, generator=gen) * torch.tensor([3.0, 1.5, 0.5])
    embeddings = coefficients @ basis.T + 0.01 * torch.randn(200, 32, generator=gen) + 5.0  # offset: centred away
    directions, explained = principal_directions(embeddings, 3)
    for j in range(3):
        assert abs(float(directions[j] @ basis[:, j])) > 0.99, j
    assert float(explained[0]) > 0.7  # 9 / (9 + 2.25 + 0.25) of the variance


def test_bad_k_and_bad_concepts_are_refused():
    with pytest.raises(SliderError, match="K = 5 directions need more than K images"):
        principal_directions(torch.randn(5, 8), 5)
    with pytest.raises(SliderError, match=r"\[N, D\]"):
        principal_directions(torch.randn(5), 1)
    with pytest.raises(SliderError, match="concept prompt is empty"):
        generate_concept_images(object(), " ", 8)


def test_shapes_concept_images_and_their_directions():
    from sliders_core.cli import load_model
    from sliders_core.shapes.encoder import load_shapes_encoder

    model, encoder = load_model("shapes"), load_shapes_encoder()
    assert isinstance(encoder, ImageEmbedder)
    found = generate_concept_images(model, "a shape", 24, variations=["a shape", "a circle"], seed=10, batch=12)
    assert found.images.shape == (24, 32, 32, 3) and found.seeds == list(range(10, 34))
    assert found.prompts[:3] == ["a shape", "a circle", "a shape"]
    first = generate_concept_images(model, "a shape", 4, seed=3, batch=2)
    torch.testing.assert_close(generate_concept_images(model, "a shape", 4, seed=3, batch=2).latents,
                               first.latents, atol=0, rtol=0)  # same arguments, same images
    directions, explained = principal_directions(encoder.embed(found.images.float()), 4)
    assert directions.shape == (4, encoder.config["dim"]) and float(explained[0]) > 0.1
    # what the model varies for "a shape" shows up as directions: each attribute explains most of the
    # spread along one of the leading directions (R² of the projection by attribute value); measured
    # here: shape .88 on the first, size .94 on the third, colour .78 on the fourth
    from sliders_core.shapes.metrics import measure_batch

    measured = measure_batch(found.images.numpy())
    embeddings = encoder.embed(found.images.float())
    r2 = [{a: explained_by(embeddings @ d, [getattr(m, a) for m in measured]) for a in ("size", "color", "shape")}
          for d in directions]
    assert max(r2[0].values()) > 0.7, r2
    assert all(max(r[a] for r in r2) > 0.6 for a in ("size", "color", "shape")), r2


def explained_by(projection: torch.Tensor, labels: list[str]) -> float:
    """Share of the projection's variance explained by the label groups (one-way ANOVA R²)."""
    values = projection.detach().numpy().astype(np.float64)
    labels = np.array(labels)
    within = sum(((values[labels == g] - values[labels == g].mean()) ** 2).sum() for g in set(labels))
    return 1 - within / ((values - values.mean()) ** 2).sum()


def test_discovered_sliders_move_the_embedding_along_their_directions(tmp_path):
    """Two sliders trained on the first two directions of "a shape": on fresh noised images, α = +1 moves
    the embedding towards its direction and α = −1 away from it; the files are normal slider files."""
    from sliders_core.cli import load_model
    from sliders_core.formats import load_slider
    from sliders_core.shapes.encoder import load_shapes_encoder
    from sliders_core.sliderspace import SliderSpaceConfig, embedding_change, train_sliderspace
    from sliders_core.training import slider_modules

    model, encoder = load_model("shapes"), load_shapes_encoder()
    found = generate_concept_images(model, "a shape", 24, seed=10, batch=12)
    directions, explained = principal_directions(encoder.embed(found.images.float()), 2)
    results = train_sliderspace(model, encoder, found, directions, explained, "a shape",
                                SliderSpaceConfig(iterations=100, lr=5e-3), checkpoint_dir=tmp_path, progress=False)
    cond = model.encode(["a shape"])
    for j, result in enumerate(results):
        assert np.mean(result.losses[-20:]) < np.mean(result.losses[:20]), j
        gen = torch.Generator().manual_seed(99)
        with torch.no_grad():
            plus = embedding_change(model, encoder, f"direction_{j}", found.latents[:12], cond, gen, 1.0)
            gen = torch.Generator().manual_seed(99)
            minus = embedding_change(model, encoder, f"direction_{j}", found.latents[:12], cond, gen, -1.0)
        along_plus = float(torch.nn.functional.cosine_similarity(plus, directions[j][None]).mean())
        along_minus = float(torch.nn.functional.cosine_similarity(minus, directions[j][None]).mean())
        print(f"direction {j}: cos at α +1 {along_plus:.2f}, at α −1 {along_minus:.2f}")
        assert along_plus > 0.2 and along_minus < -0.1, (j, along_plus, along_minus)  # random: 1/√128 ≈ 0.09
        weights = load_slider(tmp_path / f"direction_{j}.safetensors", model.naming, family="shapes")
        assert weights.metadata["sliders.kind"] == "sliderspace" and weights.metadata["sliders.direction"] == str(j)
        kv = slider_modules(model, "xattn_kv")  # cross-attention keys and values, as the reference
        assert sorted(weights.modules) == kv and all(m.up.shape[1] == 1 for m in weights.modules.values())  # rank 1
    model.sliders.set_scales({})


def test_independent_rotation_separates_factors_that_pca_mixes():
    """Two independent factors with the same spread (a three-level one, like size, and a two-level one, like
    a binary attribute): any rotation of their plane is as principal as another, so PCA returns mixtures;
    the independent rotation recovers each factor's axis. Orthonormal rows, ordered by explained variance."""
    gen = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(24, 2, generator=gen))
    levels = torch.randint(3, (400,), generator=gen).float() - 1  # −1, 0, 1: variance 2/3
    binary = (torch.randint(2, (400,), generator=gen).float() * 2 - 1) * (2 / 3) ** 0.5  # same variance
    embeddings = torch.stack([levels, binary], 1) @ basis.T + 0.02 * torch.randn(400, 24, generator=gen)
    found, explained = principal_directions(embeddings, 2, "independent")
    torch.testing.assert_close(found @ found.T, torch.eye(2), atol=1e-5, rtol=0)
    alignment = (found @ basis).abs()  # |cos| of each direction with each true axis
    assert sorted(alignment.max(dim=1).values.tolist())[0] > 0.98, alignment
    assert (explained[0] >= explained[1]) and abs(float(explained.sum()) - 1) < 0.01
    pca, _ = principal_directions(embeddings, 2, "pca")
    assert float((pca @ basis).abs().max(dim=1).values.min()) < 0.95  # the principal axes are mixtures here
    torch.testing.assert_close(principal_directions(embeddings, 2, "independent")[0], found, atol=0, rtol=0)
    with pytest.raises(SliderError, match="rotation must be one of"):
        principal_directions(embeddings, 2, "varimax")


def test_an_embedder_that_does_not_fit_is_refused():
    from sliders_core.shapes.encoder import load_shapes_encoder
    from sliders_core.sliderspace import embed_images

    with pytest.raises(SliderError, match=r"takes images \[B, 32, 32, 3\]"):
        embed_images(load_shapes_encoder(), torch.rand(4, 64, 64, 3))

    class OneVector:
        def embed(self, images):
            return torch.ones(1, 8)

    with pytest.raises(SliderError, match="one embedding vector per image"):
        embed_images(OneVector(), torch.rand(4, 32, 32, 3))


def tiny_clip_folder(path):
    """A randomly initialised CLIP vision model with projection, saved as a transformers folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    return path


def test_a_transformers_clip_folder_embeds_differentiably(tmp_path):
    from sliders_core.backends.clip_vision import TransformersClipEmbedder

    embedder = TransformersClipEmbedder(tiny_clip_folder(tmp_path / "clip"))
    images = torch.rand(3, 48, 40, 3, requires_grad=True)  # not square, not the model's size: resized and cropped
    embeddings = embedder.embed(images)
    assert embeddings.shape == (3, 16)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    embeddings[:, 0].sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0  # gradients reach the pixels
    assert isinstance(embedder, ImageEmbedder)
    with pytest.raises(SliderError, match="not a transformers model folder"):
        TransformersClipEmbedder(tmp_path)
