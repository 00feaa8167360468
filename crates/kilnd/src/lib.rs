//! The kiln daemon. It owns the API server, the metadata store, the MicroVM supervisor and
//! the endpoint proxy; they arrive with the image and MicroVM issues and build on `kiln-vmm`.
