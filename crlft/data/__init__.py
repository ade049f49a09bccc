"""The data stage's core, without Ray: records (`records`), readers (`readers`), one record -> tokens (`tokenize`),
the one template (`template`), packing (`pack`, `shards`), replay's rules (`replay`), the completion store (`store`)
and the stage's contract with training, stats.json (`stats`). jobs/build_dataset.py runs these on Ray Data."""
