"""Ray Data batch jobs: embed (images -> feature store), caption and VQA (images -> captions,
answers), and eval (scores of a caption store); each reads with sources.py, decodes with decode.py and
writes a store.py store through job.py."""
