"""The Gradio playground, served at `/ui` by the neo-serve application (installed as `neo_serve.ui`).

- `deployment`: the one-replica `Playground` deployment that runs the Gradio app.
- `blocks`: the page (prompt, examples, model picker, sampling controls, streaming output, figures).
- `backend`: runs a generation on a pipeline deployment through its Serve handle and times it.
- `bridge`: HTTP over a Serve handle, from the (autoscaled) router to the playground replica.

Only `blocks` imports Gradio, inside the playground's replica.
"""
