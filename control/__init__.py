"""Control plane: data model, crypto, RunPod client, the `gatewayctl` command line and the stack launcher."""
