"""The stream worker: the Faust app, the classify agent, the pipeline, the transport, the buffer
sink, sampling, metrics and topic administration. Imports ``worker.models`` and the root."""
