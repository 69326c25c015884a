/* tls.c: the SSL_CTX for HTTPS listeners (see http.h). */
