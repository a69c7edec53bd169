"""What serves a model: the ONNX helpers shared by teacher and students, the student runtime,
its child process, and the registry of promoted versions. Imports only the package root."""
