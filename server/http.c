/* http.c: HTTP/1.1 connections (see http.h). Event loop thread only. */
