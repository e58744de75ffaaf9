# reconciler pathsafe: every file operation on a managed path, never following a link.
#
# A path is resolved one component at a time from /: each directory is opened with
# O_DIRECTORY|O_NOFOLLOW relative to the previous one, checked (owner, mode) on the open handle
# and entered with fchdir, so the last directory is pinned by inode and the leaf is used only
# by a relative name inside it (lstat, rename, link, unlink, symlink, open with O_NOFOLLOW).
# Ownership and mode are set on the open file (fchown/fchmod), never by path.
#
# Policy: every directory above a managed path is a real directory owned by root and not
# group/other-writable (a root-owned sticky directory such as /tmp is accepted above the
# parent, never as the parent), except the directories at and below TOP, which may also
# belong to USER (the fleet says so for that path). Anything else is refused with the reason.
#
# Input: "stdin" mode reads a marker line, then fields as "<length>\n<bytes>"; "args" mode
# takes the fields from argv and the marker from $RCL_N. Operations (name, then its fields):
#   token TOKEN | gate | flush ID | stat PATH TOP USER HASH | read ID PATH TOP USER LIMIT
#   stage IDX PATH TOP USER KIND MODE OWNER GROUP DATA VALCOPY
#   swap IDX PATH TOP USER BACKUP KIND OWNER TARGET EXPECT(dev:ino from stage, or "")
#   meta IDX PATH TOP USER WHAT MODE OWNER GROUP
#   delete IDX PATH TOP USER BACKUP | restore IDX PATH TOP USER HADBACKUP | unstage PATH TOP USER
#   clean PATH TOP USER KEEP | journal PATH CONTENT
# Output: the one host-script framing (reconciler.host.script), the marker as its nonce: each
# status "TAG IDX text" (text: printable ASCII only) is section "status.<n>"; stat/read print
# their sections ("\n@@<marker><ID\n ... \n@@<marker>>ID RC\n").
use strict;    # (these two lines are dropped from the copy sent to hosts: they cost start-up
use warnings;  # time; the tests run the file as it is, with them)
# Fcntl without its importer (Exporter's work is most of its load time); the O_* values differ
# between architectures, the file types and errno-base values below do not (Linux)
require Fcntl;
my ($O_RDONLY, $O_WRONLY, $O_CREAT, $O_EXCL, $O_NOFOLLOW, $O_DIRECTORY, $O_NONBLOCK, $F_SETFD) = (
    Fcntl::O_RDONLY(), Fcntl::O_WRONLY(), Fcntl::O_CREAT(), Fcntl::O_EXCL(),
    Fcntl::O_NOFOLLOW(), Fcntl::O_DIRECTORY(), Fcntl::O_NONBLOCK(), Fcntl::F_SETFD());
sub S_ISREG { return ($_[0] & 0170000) == 0100000 }
sub S_ISDIR { return ($_[0] & 0170000) == 0040000 }
sub S_ISLNK { return ($_[0] & 0170000) == 0120000 }
sub S_ISFIFO { return ($_[0] & 0170000) == 0010000 }
sub S_ISSOCK { return ($_[0] & 0170000) == 0140000 }
sub S_ISCHR { return ($_[0] & 0170000) == 0020000 }
sub S_ISBLK { return ($_[0] & 0170000) == 0060000 }
my ($ENOENT, $EEXIST) = (2, 17);

$ENV{PATH} = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
$ENV{LC_ALL} = 'C';
umask 022;
binmode STDOUT;
binmode STDIN;

my $M = '-';        # marker of status lines and sections
my $TOKEN = '';     # this apply's token: names of staged temps and backups
my $STAGE_FAILED = 0;
my (%STAGED, %CLEANED, @REC, @HASH);
my $MARK = qr/\A\..+\.reconciler-(?:bak-)?[0-9a-f]+\z/s;

sub txt { my $t = shift; $t =~ s/[^\x20-\x7e]/?/g; return $t }
my $NSTATUS = 0;
sub status {
    my ($tag, $idx, $text) = @_;
    my $id = 'status.' . ++$NSTATUS;
    print "\n\@\@$M<$id\n$tag $idx" . (defined $text && length $text ? ' ' . txt($text) : '')
        . "\n\@\@$M>$id 0\n";
    return 0;
}

my (%UID, %GID, %UNAME, %GNAME);
sub uid_of {
    my $n = shift;
    return $UID{$n} if exists $UID{$n};
    my @p = getpwnam($n);
    return $UID{$n} = (@p ? $p[2] : undef);
}
sub gid_of {
    my $n = shift;
    return $GID{$n} if exists $GID{$n};
    my @g = getgrnam($n);
    return $GID{$n} = (@g ? $g[2] : undef);
}
sub uname { my $u = shift; $UNAME{$u} //= (scalar getpwuid($u)) // $u; return $UNAME{$u} }
sub gname { my $g = shift; $GNAME{$g} //= (scalar getgrgid($g)) // $g; return $GNAME{$g} }

sub under { my ($p, $top) = @_; return $top ne '' && ($p eq $top || index($p, "$top/") == 0) }

# the directory policy, on an open directory handle; '' when acceptable
sub dir_policy {
    my ($here, $fh, $controlled, $cuid, $is_parent, $user) = @_;
    my @s = stat($fh) or return "$here: cannot stat: $!";
    return "$here is not a directory" unless S_ISDIR($s[2]);
    my ($mode, $uid, $gid) = ($s[2] & 07777, $s[4], $s[5]);
    if ($uid != 0 && !($controlled && $uid == $cuid)) {
        my $how = ($mode & 0200) ? 'is writable by' : 'is owned by';
        my $hint = $controlled ? " (only $user may control it, says the fleet)" : '';
        return "$here $how uid $uid (" . uname($uid) . ")$hint";
    }
    my $sticky_ok = ($mode & 01000) && $uid == 0 && !$is_parent;
    return "$here is writable by every user (mode " . sprintf('%04o', $mode) . ')'
      if ($mode & 0002) && !$sticky_ok;
    return "$here is writable by group " . gname($gid) if ($mode & 0020) && !$sticky_ok;
    return '';
}

sub describe {
    my ($name, $here, $err) = @_;
    my @l = lstat($name);
    return "$here: $err" unless @l;
    if (S_ISLNK($l[2])) {
        my $t = readlink($name);
        return "$here is a symlink to " . ($t // '?');
    }
    return "$here is not a directory" unless S_ISDIR($l[2]);
    return "$here: $err";
}

# Pin the parent directory of PATH as the working directory. Returns ('ok', leaf, parent,
# parent_controlled), ('absent', first missing directory) or ('refused', reason).
sub walk {
    my ($path, $top, $user, $create) = @_;
    return ('refused', "$path: not an absolute, normalised path")
      if $path !~ m{\A(?:/[^/\0]+)+\z} || $path =~ m{/\.\.?(?:/|\z)};
    my $cuid = -1;
    if ($top ne '') {
        return ('refused', "$path: $top is not one of its directories") unless index($path, "$top/") == 0;
        my $u = uid_of($user);
        return ('refused', "$path: no user $user on this host (named to control $top)") unless defined $u;
        $cuid = $u;
    }
    my @parts = split m{/}, substr($path, 1);
    my $leaf = pop @parts;
    sysopen(my $dh, '/', $O_RDONLY | $O_DIRECTORY | $O_NOFOLLOW) or return ('refused', "/: $!");
    my $why = dir_policy('/', $dh, 0, $cuid, !@parts, $user);
    return ('refused', $why) if $why;
    chdir($dh) or return ('refused', "/: cannot enter: $!");
    my $cur = '';
    for my $i (0 .. $#parts) {
        my $c = $parts[$i];
        my $here = "$cur/$c";
        my $d;
        if (!sysopen($d, $c, $O_RDONLY | $O_DIRECTORY | $O_NOFOLLOW)) {
            my ($err, $missing) = ("$!", $! + 0 == $ENOENT);
            return ('refused', describe($c, $here, $err)) unless $missing && !lstat($c);
            return ('absent', $here) unless $create;
            mkdir($c, 0755) or $! + 0 == $EEXIST or return ('refused', "$here: cannot create: $!");
            sysopen($d, $c, $O_RDONLY | $O_DIRECTORY | $O_NOFOLLOW)
              or return ('refused', describe($c, $here, "$!"));
        }
        $why = dir_policy($here, $d, under($here, $top), $cuid, $i == $#parts, $user);
        return ('refused', $why) if $why;
        chdir($d) or return ('refused', "$here: cannot enter: $!");
        $cur = $here;
    }
    return ('ok', $leaf, ($cur eq '' ? '/' : $cur), under($cur, $top));
}

sub kind_of {
    my $m = shift;
    return S_ISREG($m) ? 'f' : S_ISLNK($m) ? 'l' : S_ISDIR($m) ? 'd' : S_ISFIFO($m) ? 'p'
      : S_ISSOCK($m) ? 's' : S_ISCHR($m) ? 'c' : S_ISBLK($m) ? 'b' : 'o';
}

# open the leaf (in the pinned directory) for reading: a regular file, never through a link
sub open_read {
    my ($leaf, $path, $controlled) = @_;
    my @l = lstat($leaf) or return (undef, "$path is missing");
    return (undef, "$path is a symlink") if S_ISLNK($l[2]);
    return (undef, "$path is not a regular file") unless S_ISREG($l[2]);
    sysopen(my $fh, $leaf, $O_RDONLY | $O_NOFOLLOW | $O_NONBLOCK) or return (undef, "$path: $!");
    my @s = stat($fh);
    return (undef, "$path changed while it was opened")
      unless @s && S_ISREG($s[2]) && $s[0] == $l[0] && $s[1] == $l[1];
    return (undef, "$path has $s[3] hard links in a directory another user controls: not read")
      if $controlled && $s[3] > 1;
    return ($fh, undef);
}

sub record { return join("\0", @_) . "\0" }

sub op_stat {
    my ($path, $top, $user, $hash) = @_;
    my ($st, @w) = walk($path, $top, $user, 0);
    if ($st eq 'refused') { push @REC, record($path, 'R', '', '', '', $w[0], ''); return }
    return if $st eq 'absent';
    my ($leaf, $dir, $ctl) = @w;
    my @l = lstat($leaf) or return;
    my $k = kind_of($l[2]);
    if ($k eq 'f' && $ctl && $l[3] > 1) {
        push @REC, record($path, 'R', '', '', '',
            "$path has $l[3] hard links in a directory another user controls: not read", '');
        return;
    }
    my $target = $k eq 'l' ? (readlink($leaf) // '') : '';
    push @REC, record($path, $k, sprintf('%o', $l[2] & 07777), uname($l[4]), gname($l[5]), $target, $l[4]);
    if ($hash eq '1' && $k eq 'f') {
        my ($fh) = open_read($leaf, $path, $ctl);
        push @HASH, [$path, $fh] if $fh;
    }
}

# sha256sum reads the files this process opened safely (/dev/fd/N: the same open file)
sub hash_all {
    my $rc = 0;
    while (my @chunk = splice(@HASH, 0, 200)) {
        my (%byfd, @args);
        for my $e (@chunk) {
            fcntl($e->[1], $F_SETFD, 0);
            my $n = '/dev/fd/' . fileno($e->[1]);
            $byfd{$n} = $e->[0];
            push @args, $n;
        }
        my $ph;
        if (!open($ph, '-|', 'sha256sum', '-z', '--', @args)) { $rc = 126; last }
        binmode $ph;
        local $/ = "\0";
        while (my $r = <$ph>) {
            chomp $r;
            print "$1  $byfd{$2}\0" if $r =~ /\A([0-9a-f]{64})  (.*)\z/s && exists $byfd{$2};
        }
        close($ph);
        $rc = $? >> 8 if $? >> 8;
        close($_->[1]) for @chunk;
    }
    return $rc;
}

sub op_flush {
    my ($id) = @_;
    print "\n\@\@$M<$id.st\n", @REC, "\n\@\@$M>$id.st 0\n";
    print "\n\@\@$M<$id.hs\n";
    my $rc = hash_all();
    print "\n\@\@$M>$id.hs $rc\n";
    @REC = ();
}

sub op_read {
    my ($id, $path, $top, $user, $limit) = @_;
    print STDERR "\@\@$M<$id\n";
    print "\n\@\@$M<$id\n";
    my ($st, @w) = walk($path, $top, $user, 0);
    my $rc = 3;
    if ($st eq 'ok') {
        my ($fh, $why) = open_read($w[0], $path, $w[2]);
        if ($fh) {
            my $buf = '';
            while (length($buf) < $limit) {
                my $n = sysread($fh, $buf, $limit - length($buf), length($buf));
                last unless $n;
            }
            print $buf;
            $rc = 0;
        } else {
            print STDERR txt($why), "\n";
        }
    } else {
        print STDERR txt($st eq 'absent' ? "$path is missing" : $w[0]), "\n";
    }
    print "\n\@\@$M>$id $rc\n";
}

# remove leftovers (staged temps, backups) of earlier applies from the pinned directory
sub clean_here {
    my ($keep) = @_;
    my @d = stat('.') or return;
    return if $keep && $CLEANED{"$d[0]:$d[1]"}++;
    opendir(my $dh, '.') or return;
    for my $n (readdir $dh) {
        next unless $n =~ $MARK;
        next if $keep && $TOKEN ne '' && $n =~ /-\Q$TOKEN\E\z/;
        my @l = lstat($n) or next;
        unlink($n) if S_ISREG($l[2]) || S_ISLNK($l[2]);
    }
    closedir($dh);
}

sub op_clean {
    my ($path, $top, $user, $keep) = @_;
    my ($st) = walk($path, $top, $user, 0);
    clean_here($keep eq '1') if $st eq 'ok';
}

sub stage_fail { my ($idx, $why) = @_; $STAGE_FAILED = 1; return status('S', $idx, "fail $why") }

sub write_all {
    my ($fh, $data) = @_;
    my $off = 0;
    while ($off < length $data) {
        my $n = syswrite($fh, $data, length($data) - $off, $off);
        return 0 unless defined $n;
        $off += $n;
    }
    return 1;
}

# a root-only copy for a file's own validator when its directory is not root's alone
sub write_private {
    my ($path, $data) = @_;
    my ($st, $leaf) = walk($path, '', '', 1);
    return "validation copy: $leaf" unless $st eq 'ok';
    unlink($leaf);
    sysopen(my $fh, $leaf, $O_WRONLY | $O_CREAT | $O_EXCL | $O_NOFOLLOW, 0600) or return "validation copy: $!";
    write_all($fh, $data) or return "validation copy: $!";
    close($fh) or return "validation copy: $!";
    return '';
}

sub op_stage {
    my ($idx, $path, $top, $user, $kind, $mode, $owner, $group, $data, $valcopy) = @_;
    my ($st, $leaf, $dir) = walk($path, $top, $user, 1);
    return stage_fail($idx, "refused: $leaf") unless $st eq 'ok';
    clean_here(1);
    my $tmp = ".$leaf.reconciler-$TOKEN";
    if ($kind eq 'l') {
        symlink($data, $tmp) or return stage_fail($idx, "cannot create $dir/$tmp: $!");
    } else {
        my $uid = uid_of($owner);
        return stage_fail($idx, "unknown user $owner on this host") unless defined $uid;
        my $gid = gid_of($group);
        return stage_fail($idx, "unknown group $group on this host") unless defined $gid;
        return stage_fail($idx, "bad mode $mode") unless $mode =~ /\A[0-7]{1,5}\z/;
        sysopen(my $fh, $tmp, $O_WRONLY | $O_CREAT | $O_EXCL | $O_NOFOLLOW, 0600)
          or return stage_fail($idx, "cannot create $dir/$tmp: $!");
        my $ok = write_all($fh, $data) && chown($uid, $gid, $fh) && chmod(oct($mode), $fh);
        my $err = "$!";
        my @s = stat($fh);
        if (!(close($fh) && $ok)) { unlink($tmp); return stage_fail($idx, "cannot write $dir/$tmp: $err") }
        $STAGED{$idx} = "$s[0]:$s[1]";
        if ($valcopy ne '') {
            my $why = write_private($valcopy, $data);  # (walks away from the target's directory)
            if ($why) { op_unstage($path, $top, $user); return stage_fail($idx, $why) }
        }
        return status('S', $idx, "ok $s[0]:$s[1]");
    }
    return status('S', $idx, 'ok');
}

sub op_gate {
    return unless $STAGE_FAILED;
    status('GATE', 0, 'closed: a file could not be staged, nothing swapped');
    exit 0;
}

sub op_journal {
    my ($path, $content) = @_;
    my ($st, $leaf, $dir) = walk($path, '', '', 1);
    my $why = $st eq 'ok' ? '' : $leaf;
    if (!$why && $content eq '') {
        $why = "cannot clear: $!" if !unlink($leaf) && $! + 0 != $ENOENT;
    } elsif (!$why) {
        my $tmp = ".$leaf.reconciler-$TOKEN";
        unlink($tmp);
        if (sysopen(my $fh, $tmp, $O_WRONLY | $O_CREAT | $O_EXCL | $O_NOFOLLOW, 0644)) {
            $why = "cannot write: $!" unless write_all($fh, $content) && close($fh) && rename($tmp, $leaf);
        } else {
            $why = "cannot write: $!";
        }
        unlink($tmp) if $why;
    }
    return unless $why;
    status('J', 0, "cannot write the pending-reloads journal $path: $why");
    exit 20;
}

sub op_swap {
    my ($idx, $path, $top, $user, $backup, $kind, $owner, $target, $expect) = @_;
    $STAGED{$idx} = $expect if $expect ne '';
    my ($st, $leaf, $dir) = walk($path, $top, $user, 0);
    return status('F', $idx, "refused: $leaf") if $st eq 'refused';
    return status('F', $idx, "$leaf vanished after staging") if $st eq 'absent';
    my $tmp = ".$leaf.reconciler-$TOKEN";
    my @t = lstat($tmp) or return status('F', $idx, "the staged copy $dir/$tmp is gone");
    my $ours = $kind eq 'l'
      ? S_ISLNK($t[2]) && (readlink($tmp) // '') eq $target
      : S_ISREG($t[2]) && $t[3] == 1 && defined(uid_of($owner)) && $t[4] == uid_of($owner)
        && (!exists $STAGED{$idx} || $STAGED{$idx} eq "$t[0]:$t[1]");
    if (!$ours) {
        my $now = S_ISLNK($t[2]) ? 'a symlink to ' . (readlink($tmp) // '?') : 'not the staged file';
        unlink($tmp);
        return status('F', $idx, "the staged copy $dir/$tmp was replaced ($now): not swapped");
    }
    my @l = lstat($leaf);
    if (@l && S_ISDIR($l[2])) { unlink($tmp); return status('F', $idx, 'a directory is in the way') }
    if ($backup eq '1' && @l) {
        my $bak = ".$leaf.reconciler-bak-$TOKEN";
        unlink($bak);
        if (!link($leaf, $bak)) { my $e = "$!"; unlink($tmp); return status('F', $idx, "cannot back up: $e") }
        status('B', $idx);
    }
    if (!rename($tmp, $leaf)) { my $e = "$!"; unlink($tmp); return status('F', $idx, "could not swap: $e") }
    return status('OK', $idx);
}

sub op_meta {
    my ($idx, $path, $top, $user, $what, $mode, $owner, $group) = @_;
    my ($st, $leaf, $dir, $ctl) = walk($path, $top, $user, 0);
    return status('F', $idx, "refused: $leaf") if $st eq 'refused';
    return status('F', $idx, "$path is gone") if $st eq 'absent';
    my @l = lstat($leaf) or return status('F', $idx, "$path is gone");
    return status('F', $idx, "$path is a symlink now (to " . (readlink($leaf) // '?') . '): not changed')
      if S_ISLNK($l[2]);
    my ($fh, $why) = open_read($leaf, $path, $ctl);
    return status('F', $idx, "$why: not changed") unless $fh;
    return status('F', $idx, "bad mode $mode") unless $mode =~ /\A[0-7]{1,5}\z/;
    if ($what eq 'chown') {
        my $uid = uid_of($owner);
        return status('F', $idx, "unknown user $owner on this host") unless defined $uid;
        my $gid = gid_of($group);
        return status('F', $idx, "unknown group $group on this host") unless defined $gid;
        chown($uid, $gid, $fh) or return status('F', $idx, "chown failed: $!");
    }
    # (after a chown too: it may clear the set-id bits)
    chmod(oct($mode), $fh) or return status('F', $idx, "chmod failed: $!");
    return status('OK', $idx);
}

sub op_delete {
    my ($idx, $path, $top, $user, $backup) = @_;
    my ($st, $leaf) = walk($path, $top, $user, 0);
    return status('F', $idx, "not deleted: $leaf") if $st eq 'refused';
    return status('OK', $idx, 'already gone') if $st eq 'absent';
    my @l = lstat($leaf) or return status('OK', $idx, 'already gone');
    return status('F', $idx, 'is a directory, not deleted') if S_ISDIR($l[2]);
    if ($backup eq '1') {
        my $bak = ".$leaf.reconciler-bak-$TOKEN";
        unlink($bak);
        link($leaf, $bak) or return status('F', $idx, "cannot back up: $!");
        status('B', $idx);
    }
    unlink($leaf) or return status('F', $idx, "could not delete: $!");
    return status('OK', $idx);
}

sub op_restore {
    my ($idx, $path, $top, $user, $had) = @_;
    my ($st, $leaf) = walk($path, $top, $user, 0);
    return status('RF', $idx, "cannot restore $path: $leaf") if $st eq 'refused';
    return status('RF', $idx, "cannot restore $path: $leaf is missing") if $st eq 'absent';
    if ($had eq '1') {
        my $bak = ".$leaf.reconciler-bak-$TOKEN";
        lstat($bak) or return status('RF', $idx, "cannot restore $path: its backup is gone");
        rename($bak, $leaf) or return status('RF', $idx, "cannot restore $path: $!");
    } else {
        my @l = lstat($leaf);
        unlink($leaf) if @l && !S_ISDIR($l[2]);
    }
    return status('R', $idx);
}

sub op_unstage {
    my ($path, $top, $user) = @_;
    my ($st, $leaf) = walk($path, $top, $user, 0);
    return unless $st eq 'ok';
    my $tmp = ".$leaf.reconciler-$TOKEN";
    my @l = lstat($tmp);
    unlink($tmp) if @l && !S_ISDIR($l[2]);
}

sub op_token {
    my ($t) = @_;
    die "reconciler pathsafe: bad token\n" unless $t =~ /\A[0-9a-f]{4,64}\z/;
    $TOKEN = $t;
}

my %OPS = (
    token => [1, \&op_token], gate => [0, \&op_gate], flush => [1, \&op_flush],
    stat => [4, \&op_stat], read => [5, \&op_read], stage => [10, \&op_stage],
    swap => [9, \&op_swap], meta => [8, \&op_meta], delete => [5, \&op_delete],
    restore => [5, \&op_restore], unstage => [3, \&op_unstage], clean => [4, \&op_clean],
    journal => [2, \&op_journal],
);

sub field_stdin {
    my $len = <STDIN>;
    return undef unless defined $len;
    chomp $len;
    die "reconciler pathsafe: bad field length\n" unless $len =~ /\A[0-9]{1,9}\z/;
    my $buf = '';
    while (length($buf) < $len) {
        my $n = read(STDIN, $buf, $len - length($buf), length($buf));
        die "reconciler pathsafe: input cut short\n" unless $n;
    }
    return $buf;
}

my $how = shift(@ARGV) // '';
my $next;
if ($how eq 'stdin') {
    my $m = <STDIN> // '';
    chomp $m;
    $M = $m;
    $next = \&field_stdin;
} elsif ($how eq 'args') {
    $M = $ENV{RCL_N} // '-';
    $next = sub { return shift @ARGV };
} else {
    die "reconciler pathsafe: usage: stdin | args OPERATION...\n";
}
die "reconciler pathsafe: bad marker\n" unless $M eq '-' || $M =~ /\A[0-9a-f]{8,64}\z/;
while (defined(my $op = $next->())) {
    my $spec = $OPS{$op} or die "reconciler pathsafe: unknown operation " . txt($op) . "\n";
    my @f;
    for (1 .. $spec->[0]) {
        my $v = $next->();
        die "reconciler pathsafe: $op: missing fields\n" unless defined $v;
        push @f, $v;
    }
    $spec->[1]->(@f);
}
exit 0;
