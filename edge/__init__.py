"""Edge agent: audio -> ONNX front end -> VQ codes -> MQTT. numpy + onnxruntime + paho only."""
