"""refformer.export: the model as ONNX graphs, and their verification against refimpl (docs/DESIGN.md, Layout).

  contract.py   the graph contract: graph files, decoder variants, input/output names and signatures, dtypes,
                error bounds, provider names (read by export, verify and the runtime)
  graph.py      Graph: a stateless builder, one helper per op, node names as paths
  ops.py        twins of refimpl/ops.py: linear, norms, activations, embedding lookup
  attention.py  twins of refimpl/attention.py: masks, attention, heads, multi-head and cached self-attention
  layers.py     twins of refimpl/layers.py: feed-forward, residual, encoder layer, THE decoder layer
  model.py      twin of refimpl/model.py: embeddings, LM head, encoder.onnx and every decoder variant
  fused.py      ONNX Runtime's com.microsoft contrib ops: the pieces of the fused variants
  folder.py     the export folder format: where export sets live, manifest.json, leftovers of killed exports
  session.py    ONNX Runtime in one place: import, sessions, provider, silencing its native output
  verify.py     `refformer verify`: every graph against refimpl in float64, within contract.ERROR_BOUNDS
  export.py     `refformer export`: build, check, measure and write one export set atomically

Dependencies run one way: export -> verify -> folder, session -> contract; model -> layers, fused -> attention
-> ops -> graph. export never imports the runtime.
"""
