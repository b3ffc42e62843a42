// The microphone's samples, in chunks of `chunk` frames (about 100 ms), posted to the page,
// which sends each as one binary WebSocket frame of float32 PCM (the protocol's f32le).
class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunk = options.processorOptions.chunk;
    this.buffer = new Float32Array(this.chunk);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0]; // the first channel: the session is mono
    if (channel) {
      let read = 0;
      while (read < channel.length) {
        const n = Math.min(channel.length - read, this.chunk - this.filled);
        this.buffer.set(channel.subarray(read, read + n), this.filled);
        this.filled += n;
        read += n;
        if (this.filled === this.chunk) {
          this.port.postMessage(this.buffer.buffer, [this.buffer.buffer]);
          this.buffer = new Float32Array(this.chunk);
          this.filled = 0;
        }
      }
    }
    return true; // keep running until the page disconnects the node
  }
}

registerProcessor("capture", Capture);
