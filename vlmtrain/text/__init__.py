"""The text side of a sample: tokenizers (:mod:`.tokenizers`), conversations as stored in shards
(:mod:`.conversation`), chat templates and the spans they label (:mod:`.chat`), and the encoding of a
sample's text with its image placeholders and labels (:mod:`.encoding`)."""
