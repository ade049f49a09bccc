"""The data stage's core, without Ray: records and their validation (`records`), the inputs and their readers
(`readers`), one record -> tokens (`process`), the one template (`template`), packing (`pack`) and packing groups into
shards (`shards`), the output folder (`output`), replay's rules (`replay`), the completion store (`store`) and the
stage's contract with training, stats.json (`stats`). jobs/build_dataset.py runs these on Ray Data."""
