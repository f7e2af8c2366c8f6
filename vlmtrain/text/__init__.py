"""The text side of a sample: conversations as stored in shards (:mod:`.conversation`), chat templates and the
spans they label (:mod:`.chat`), and the encoding of a sample's text with its image placeholders and labels
(:mod:`.encoding`). Tokenizers and a prompt's ids are the model's own code (:mod:`vlmtrain.modeling.tokenizers`,
:mod:`vlmtrain.modeling.prompt`): every export ships them."""
